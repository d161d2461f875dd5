"""What the server under test should answer, learnt from somewhere other than that server.

A server that reports a truncated hidden size in ``/v1/models`` and stores
tensors of that truncated width is self-consistent; only an independent source
catches it. In order of preference:

1. the model's own ``config.json`` (the embedded tiny model is built locally; any
   other id is looked up as a local directory or in the local Hugging Face
   cache, never downloaded);
2. ``--expect-vocab`` / ``--expect-hidden`` (``--expect-layers``) given by the operator;
3. the server's own ``/v1/models`` ``capture`` block, as a last resort: the checks
   then only prove self-consistency, and ``source`` says so in the report.

Config keys differ by family (GPT-2 says ``n_embd``/``n_layer``/``n_inner``, OPT
``ffn_dim``): where transformers is installed its own config classes map them
(``attribute_map``); the light install reads ``config.json`` through the small
alias table below. A number the config does not give (GPT-2's ``n_inner: null``)
is read off the model's module tree on the ``meta`` device where possible.
Every number keeps its source in ``sources``; one taken from the server makes
the ground truth not independent, whatever the other numbers' sources.

The tokenizer (for prompt lengths and decoding) comes from the same local
directory and needs ``transformers``; without it those checks are reported as
not verifiable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SOURCE_CONFIG = "model config"
SOURCE_OPTIONS = "command-line options"
SOURCE_SERVER = "server /v1/models (not independent)"
SOURCE_MODULE_TREE = "module tree (built from the config on the meta device)"

NUMBERS = ("vocab_size", "hidden_size", "num_layers", "intermediate_size")
# The light install's key mapping; transformers' own attribute_map is preferred where it is installed.
CONFIG_ALIASES: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size", "n_vocab", "padded_vocab_size"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "model_dim", "dim"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size"),
}


@dataclass
class GroundTruth:
    model_id: str
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    intermediate_size: int | None = None
    source: str = "none"
    model_dir: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    tokenizer_note: str = ""
    sources: dict[str, str] = field(default_factory=dict)  # number -> where it came from
    # Loaded on first use: importing transformers costs seconds that most tests do not need.
    _tokenizer: Any = field(default=None, repr=False)
    _tokenizer_tried: bool = field(default=False, repr=False)

    @property
    def tokenizer(self) -> Any:
        """A transformers tokenizer of the model, or None when there is none locally."""
        if not self._tokenizer_tried:
            self._tokenizer_tried = True
            if self.model_dir is not None:
                self._tokenizer, self.tokenizer_note = _load_tokenizer(Path(self.model_dir))
        return self._tokenizer

    @property
    def independent(self) -> bool:
        """Whether every number known was learnt elsewhere than from the server under test."""
        known = [self.sources.get(n) for n in NUMBERS if getattr(self, n)]
        return bool(known) and SOURCE_SERVER not in known and None not in known

    @property
    def from_server(self) -> list[str]:
        return [n for n in NUMBERS if self.sources.get(n) == SOURCE_SERVER]

    def dims(self) -> dict[str, int]:
        """Symbol -> size, for naming the dimensions of a shape (``V``, ``H``, ``I``)."""
        named = {"V": self.vocab_size, "H": self.hidden_size, "I": self.intermediate_size}
        return {k: v for k, v in named.items() if v}

    # -- tokenizer-backed expectations -------------------------------------------------------

    def prompt_ids(self, messages: list[dict]) -> list[int] | None:
        """The ids of the chat-template-rendered prompt, as the protocol prescribes."""
        if self.tokenizer is None:
            return None
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys") and "input_ids" in ids:  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def resolve_ground_truth(
    model_id: str,
    *,
    expect_vocab: int | None = None,
    expect_hidden: int | None = None,
    expect_layers: int | None = None,
    server_capture_block: Callable[[], dict | None] | None = None,
) -> GroundTruth:
    truth = GroundTruth(model_id)
    model_dir = locate_model_dir(model_id)
    if model_dir is not None:
        config = read_model_config(model_dir)
        truth.model_dir = str(model_dir)
        numbers, how = config_numbers(model_dir, config)
        for attr, value in numbers.items():
            _set(truth, attr, value, f"{SOURCE_CONFIG} ({how})")
        if truth.intermediate_size is None:
            _set(truth, "intermediate_size", _tree_intermediate(model_dir), SOURCE_MODULE_TREE)
        truth.eos_token_ids = _eos_ids(model_dir, config)
        truth.source = f"{SOURCE_CONFIG} ({model_dir})"
    if expect_vocab or expect_hidden or expect_layers:
        # Operator's figures fill what the config did not give; a contradiction is a usage error.
        for attr, given in (("vocab_size", expect_vocab), ("hidden_size", expect_hidden), ("num_layers", expect_layers)):
            known = getattr(truth, attr)
            if given and known and given != known:
                raise ValueError(f"--expect option says {attr}={given} but the model's config.json says {known}")
            if given and not known:
                _set(truth, attr, given, SOURCE_OPTIONS)
        if model_dir is None:
            truth.source = SOURCE_OPTIONS
    missing = [a for a in ("vocab_size", "hidden_size", "num_layers") if not getattr(truth, a)]
    if missing and server_capture_block is not None:
        block = server_capture_block() or {}
        filled = [a for a in missing if _int_or_none(block.get(a))]
        for attr in filled:
            _set(truth, attr, _int_or_none(block.get(attr)), SOURCE_SERVER)
        if truth.source == "none":
            truth.source = SOURCE_SERVER
        elif filled:
            truth.source += f" (+ {', '.join(filled)} from {SOURCE_SERVER})"
    if model_dir is None:
        truth.tokenizer_note = f"no local copy of {model_id}: tokenizer checks cannot be verified"
    return truth


def config_numbers(model_dir: Path, config: dict) -> tuple[dict[str, int], str]:
    """vocab/hidden/layers/intermediate from a config, through transformers' key mapping where it is installed."""
    try:
        from transformers import AutoConfig

        loaded = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        text = loaded.get_text_config() if hasattr(loaded, "get_text_config") else loaded
        mapped = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                  "intermediate_size": "intermediate_size"}
        numbers = {attr: _int_or_none(getattr(text, key, None)) for attr, key in mapped.items()}
        # intermediate_size has no attribute_map entry in some families (GPT-2's n_inner, OPT's ffn_dim).
        rest = config_numbers_by_alias(text.to_dict())
        merged = {a: numbers.get(a) or rest.get(a) for a in NUMBERS}
        return {a: v for a, v in merged.items() if v}, "read through transformers' config classes"
    except ImportError:
        pass
    except Exception:  # an architecture this transformers does not know: the alias table still reads it
        pass
    return config_numbers_by_alias(config), "read through the alias table"


def config_numbers_by_alias(config: dict) -> dict[str, int]:
    """The light install's reading: the first key of ``CONFIG_ALIASES`` that holds an integer."""
    found: dict[str, int] = {}
    for attr, keys in CONFIG_ALIASES.items():
        value = next((v for v in (_int_or_none(config.get(k)) for k in keys) if v), None)
        if value:
            found[attr] = value
    return found


def _tree_intermediate(model_dir: Path) -> int | None:
    try:
        from capture_conformance.harness.protocol.layout import layout_from_model_dir

        return layout_from_model_dir(model_dir).intermediate_size
    except Exception:  # light install, or a family this transformers cannot build
        return None


def _set(truth: GroundTruth, attr: str, value: int | None, source: str) -> None:
    if value:
        setattr(truth, attr, value)
        truth.sources[attr] = source


def locate_model_dir(model_id: str) -> Path | None:
    """A local directory holding ``config.json`` for ``model_id``, without any download."""
    try:
        from capture_conformance.fixtures.zoo import builtin_model_dir, ensure_builtin, is_builtin

        if is_builtin(model_id):  # the embedded models (tiny-qwen3 and the zoo's families), built here
            built = builtin_model_dir(model_id)
            if (built / "config.json").exists():
                return built
            try:
                return ensure_builtin(model_id)  # needs torch and transformers to build
            except Exception:
                return None
    except ImportError:
        pass
    direct = Path(model_id).expanduser()
    if (direct / "config.json").is_file():
        return direct
    return _hf_cache_dir(model_id)


def _hf_cache_dir(model_id: str) -> Path | None:
    if "/" not in model_id:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:
        pass
    # Without huggingface_hub, read the cache layout directly (models--org--name/snapshots/<rev>/).
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    snapshots = Path(hub) / f"models--{model_id.replace('/', '--')}" / "snapshots"
    candidates = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return candidates[0].parent if candidates else None


def read_model_config(model_dir: Path) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    # Multimodal wrappers keep the language model's sizes in text_config.
    if "text_config" in config and "vocab_size" not in config:
        config = {**config, **config["text_config"]}
    return config


def _eos_ids(model_dir: Path, config: dict) -> list[int]:
    ids: list[int] = []
    sources = [config]
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()))
    for source in sources:
        value = source.get("eos_token_id")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return ids


def _load_tokenizer(model_dir: Path) -> tuple[Any, str]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None, "transformers is not installed (light install): tokenizer checks cannot be verified"
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True), ""
    except Exception as exc:  # a directory without tokenizer files, or an unknown tokenizer class
        return None, f"tokenizer of {model_dir} not loadable: {type(exc).__name__}: {exc}"


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
