"""Which model the bench runs: the embedded tiny model, a local directory, or a built shape.

``--model-shape qwen3-0.6b`` builds, once, into the project's cache directory a
random-weight model with Qwen3-0.6B's exact configuration and the tiny model's
tokenizer and chat template: the cost of generation and capture depends on the
shapes, not the weights, and no model hub is reachable here. Random weights
make greedy output arbitrary (ids outside the tokenizer decode to nothing), so
token counts come from the responses and figures are per token.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID, build_once, cache_root, ensure_tiny_model, resolve_model_path

SHAPE_RECIPE_VERSION = "1"

# Qwen/Qwen3-0.6B's config.json, less what only matters for loading weights.
SHAPES: dict[str, dict] = {
    "qwen3-0.6b": {
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
    },
}


def shape_dir(shape: str) -> Path:
    h = hashlib.sha256()
    h.update(SHAPE_RECIPE_VERSION.encode())
    h.update(json.dumps(SHAPES[shape], sort_keys=True).encode())
    h.update(ensure_tiny_model().name.encode())  # the tokenizer comes from this build of the tiny model
    return cache_root() / f"bench-{shape}-shape-{h.hexdigest()[:12]}"


def ensure_shape_model(shape: str, build_device: str = "cpu", log=print) -> Path:
    """The directory of the ``shape`` model, built first if needed (atomically, under a file lock)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {sorted(SHAPES)}")
    target = shape_dir(shape)

    def build(tmp: Path) -> None:
        log(f"building a random-weight {shape} model into {target} (once)")
        _build_shape(shape, tmp, build_device)

    return build_once(target, build)


def _build_shape(shape: str, out_dir: Path, build_device: str) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(**SHAPES[shape], eos_token_id=im_end, pad_token_id=pad, bos_token_id=None)
    torch.manual_seed(0)
    # Initialising 0.6B parameters is quick on a GPU and takes a while on a small CPU.
    device = "cuda" if build_device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    model = model.to(torch.bfloat16)  # Qwen3-0.6B ships bf16; half the bytes to write and read
    model.generation_config = GenerationConfig(eos_token_id=[im_end, pad], pad_token_id=pad, do_sample=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "capture-bench-shape.json").write_text(json.dumps({"shape": shape, "recipe": SHAPE_RECIPE_VERSION}))


def resolve(model: str, shape: str | None, build_device: str = "cpu", log=print) -> tuple[str, str, str]:
    """``(name, server_model_arg, local_path)`` for the options given."""
    if shape:
        path = str(ensure_shape_model(shape, build_device, log=log))
        return f"{shape} shape (random weights)", path, path
    if model == TINY_MODEL_ID:
        return model, model, str(ensure_tiny_model())
    return model, model, resolve_model_path(model)
