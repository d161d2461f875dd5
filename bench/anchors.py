"""The variants that run in this process: plain transformers, a hand-written hook, nnsight.

Each ``run_*`` returns ``(milliseconds, generated token count, captured tensor or None)``;
on CUDA the clock starts and stops on a synchronised device.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """The reference server's rule: auto = bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def render_prompt(tokenizer, text: str) -> list[int]:
    """The prompt ids the server makes from one user message (its chat module, same template)."""
    from capture_conformance.reference_server.chat import render_prompt as server_render

    return server_render(tokenizer, [{"role": "user", "content": text}])


def generate_kwargs(tokens: int, force: bool, pad_id: int | None) -> dict:
    """Greedy, as the server calls generate; ``force`` adds min_new_tokens (a logits processor over the vocabulary)."""
    kwargs = {"max_new_tokens": tokens, "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
              "pad_token_id": pad_id}
    if force:
        kwargs["min_new_tokens"] = tokens
    return kwargs


class HFAnchor:
    """The model through plain transformers: ``generate`` alone, and with a forward hook on its head."""

    def __init__(self, path: str, device: str, dtype: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _generate(self, prompt_ids: list[int], tokens: int, force: bool) -> torch.Tensor:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **generate_kwargs(tokens, force, self.pad_id))
        return out[0, len(prompt_ids):]

    def run_plain(self, prompt_ids: list[int], tokens: int, force: bool = False):
        _sync(self.device)
        start = time.perf_counter()
        new = self._generate(prompt_ids, tokens, force).tolist()
        _sync(self.device)
        return (time.perf_counter() - start) * 1e3, len(new), None

    def run_hooked(self, prompt_ids: list[int], tokens: int, force: bool = False):
        steps: list[torch.Tensor] = []

        def keep(module, args, output):
            # Last position of this step, cloned (a slice would keep the whole step alive), float32.
            steps.append(output[:, -1].detach().to(torch.float32, copy=True))

        handle = self.model.get_output_embeddings().register_forward_hook(keep)  # the head, whatever its name
        try:
            _sync(self.device)
            start = time.perf_counter()
            new = self._generate(prompt_ids, tokens, force).tolist()
            captured = torch.stack(steps, dim=1).cpu()
            _sync(self.device)
            ms = (time.perf_counter() - start) * 1e3
        finally:
            handle.remove()
        return ms, len(new), (captured, new)


class NNsightAnchor:
    """nnsight's own all-token ``lm_head`` capture in this process: no HTTP, no files.

    Written against nnsight's public API (not the server's core), so it measures
    nnsight whatever the server does around it.
    """

    def __init__(self, path: str, device: str, dtype: str):
        # The server's nnsight config: no `.save` mount on every object.
        config = Path(__file__).resolve().parent.parent / "reference_server" / "nnsight_config.yaml"
        if config.exists():
            os.environ.setdefault("NNSIGHT_CONFIG", str(config))
        import nnsight
        from nnsight import TransformersModel

        self._nnsight = nnsight
        self.device = device
        kwargs = {"dtype": DTYPES[dtype]}
        if device != "cpu":
            kwargs["device_map"] = device
        self.model = TransformersModel(path, task="text-generation", dispatch=True, **kwargs)
        self.model._module.eval()
        # The head's envoy, found as transformers finds the head (lm_head, embed_out, ...).
        head = self.model._module.get_output_embeddings()
        path = next(name for name, module in self.model._module.named_modules() if module is head)
        self.head = self.model
        for part in path.split("."):
            self.head = getattr(self.head, part)
        tok = self.model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(self, prompt_ids: list[int], tokens: int, force: bool = False):
        nnsight = self._nnsight
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        _sync(self.device)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with self.model.generate(**generate_kwargs(tokens, force, self.pad_id)) as tracer:
                steps = nnsight.save([])
                with tracer.invoke(ids):
                    for _ in tracer.iter[:tokens]:
                        steps.append(self.head.output[:, -1].detach().to(torch.float32, copy=True))
                with tracer.invoke():
                    result = nnsight.save(tracer.result)
        captured = torch.stack(steps, dim=1).cpu()
        new = result[0, len(prompt_ids):].tolist()
        _sync(self.device)
        return (time.perf_counter() - start) * 1e3, len(new), (captured, new)


def argmax_matches(captured: torch.Tensor, ids: list[int]) -> bool:
    """Greedy: step i's logits pick token i (catches off-by-one capture)."""
    return captured.shape[1] == len(ids) and captured[0].argmax(-1).tolist() == ids
