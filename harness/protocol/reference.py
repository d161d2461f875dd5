"""An independent computation of the served model's activations, to check captured values against.

The reference is the same checkpoint loaded with plain ``transformers`` (never
nnsight, never the reference server's code: it must not share the machinery
it checks). For a captured request it runs **one teacher-forced forward pass**
over the prompt ids followed by the completion ids, with forward hooks (and
pre-hooks for ``.input``) on the requested modules. Step i of a generated-token
capture is that pass's value at position ``P-1+i``: the pass that produced
generated token i saw the prompt and tokens ``0..i-1``, and under causal
attention position ``P-1+i`` of the full pass sees exactly the same. No
``generate``: one pass per request, and sampled requests are checked too (the
ids are the server's).

The model is loaded once per process (``get_reference``) and only when a test
asks for it: importing this module needs neither torch nor transformers, so the
light install imports it and reports *why* values cannot be verified.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capture_conformance.harness.protocol.layout import Layout, layout_from_module

EXTRA_HINT = "pip install 'capture-conformance[values]'"
DEFAULT_DEVICE = "cpu"

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


@dataclass(frozen=True)
class Site:
    """A module of the model and which side of it: ``("model.layers.1", "output")``."""

    module_path: str
    io: str = "output"

    @property
    def label(self) -> str:
        """``model.layers[1]``, ``model.layers[0].mlp.down_proj.input``: the protocol's spelling."""
        text = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", self.module_path)
        return f"{text}.input" if self.io == "input" else text


def parse_site(selector: str, *, head: str | None = None) -> Site:
    """The protocol's selector grammar (dots, ``[i]``, optional ``.input``/``.output``, alias ``logits``).

    ``head`` is the model's output head (``lm_head``, ``embed_out``), which the
    alias ``logits`` names; without it the alias stays ``logits``. Written here
    rather than imported from the reference server: the harness must not depend
    on the code it tests.
    """
    text = selector.strip()
    io = "output"
    for suffix in (".input", ".output"):
        if text.endswith(suffix):
            text, io = text[: -len(suffix)], suffix[1:]
            break
    if text == "logits" and head:
        text = head
    parts: list[str] = []
    for segment in text.split("."):
        match = _SEGMENT.fullmatch(segment)
        if match:
            parts.append(match.group(1))
            parts.extend(re.findall(r"\[(\d+)\]", match.group(2)))
        elif segment.isdigit():
            parts.append(segment)
        else:
            raise ValueError(f"not a selector: {selector!r}")
    return Site(".".join(parts), io)


@dataclass
class ReferenceStatus:
    """Whether values can be verified in this run, and if not, why."""

    available: bool
    reason: str = ""
    reference: "Reference | None" = None

    def describe(self) -> dict:
        if self.reference is None:
            return {"available": False, "reason": self.reason}
        return {"available": True, **self.reference.describe()}


@dataclass
class Reference:
    """A loaded transformers model and a small cache of its teacher-forced passes."""

    model_id: str
    model_dir: str
    device: str
    dtype: str
    model: Any = field(repr=False)
    layout: Layout = field(repr=False)
    _cache: "OrderedDict[tuple, dict[Site, np.ndarray]]" = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    CACHE_ENTRIES = 16

    def describe(self) -> dict:
        return {"model": self.model_id, "directory": self.model_dir, "device": self.device, "dtype": self.dtype,
                "library": "transformers (plain forward pass with hooks; no nnsight)"}

    @property
    def num_layers(self) -> int:
        return self.layout.num_blocks

    def site(self, selector: str) -> Site:
        """A selector of the protocol as a site of this model (``logits`` is its own head)."""
        return parse_site(selector, head=self.layout.head)

    def has_module(self, module_path: str) -> bool:
        try:
            self.model.get_submodule(module_path)
            return True
        except AttributeError:
            return False

    def values(self, prompt_ids: list[int], completion_ids: list[int], sites: list[Site]) -> dict[Site, np.ndarray]:
        """Each site's value at every position of prompt + completion: ``{site: [P+N, D] float32}``."""
        ids = tuple(int(i) for i in prompt_ids) + tuple(int(i) for i in completion_ids)
        with self._lock:
            cached = self._cache.get(ids)
            missing = [s for s in sites if cached is None or s not in cached]
            if missing:
                # One pass computes every site asked for so far for these ids: a later test on the
                # same request (another savepoint of it) costs nothing.
                fresh = self._forward(list(ids), sorted(set(missing) | set(cached or {}), key=lambda s: s.label))
                cached = {**(cached or {}), **fresh}
                self._cache[ids] = cached
                while len(self._cache) > self.CACHE_ENTRIES:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(ids)
            return {s: cached[s] for s in sites}

    def _forward(self, ids: list[int], sites: list[Site]) -> dict[Site, np.ndarray]:
        import torch

        found: dict[Site, np.ndarray] = {}
        handles = []

        def keep(site: Site, value: Any) -> None:
            value = _first_tensor(value)
            if site in found or not torch.is_tensor(value):
                return  # a module run twice per pass keeps its first value, as the server's scan does
            # [1, T, D] for most modules; OPT's fc1/fc2 see batch and position merged, [T, D] (batch of one)
            row = value if value.ndim == 2 and value.shape[0] == len(ids) else value[0]
            found[site] = row.detach().to(torch.float32).cpu().numpy().copy()

        try:
            for site in sites:
                module = self.model.get_submodule(site.module_path)
                if site.io == "input":
                    handles.append(module.register_forward_pre_hook(
                        lambda mod, args, kwargs, s=site: keep(s, args[0] if args else _first_kwarg_tensor(kwargs)),
                        with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(lambda mod, args, out, s=site: keep(s, out)))
            with torch.inference_mode():
                input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
                self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        absent = [s.label for s in sites if s not in found]
        if absent:
            raise LookupError(f"the reference model produced no tensor for {absent}")
        return found


def _first_tensor(value: Any) -> Any:
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value


def _first_kwarg_tensor(kwargs: dict) -> Any:
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if hasattr(v, "shape")), None)


# -- loading, once per process ------------------------------------------------------------------

_LOADED: dict[tuple[str, str], ReferenceStatus] = {}
_LOAD_LOCK = threading.Lock()


def get_reference(model_id: str, *, reference_model: str | None = None, device: str = DEFAULT_DEVICE,
                  model_dir: str | None = None) -> ReferenceStatus:
    """The reference for ``model_id`` (or ``--reference-model``), loaded on first use and kept for the process.

    Never raises: anything that stops the reference from loading becomes the
    ``reason`` the values area reports ("values not verifiable: <reason>").
    """
    wanted = reference_model or model_id
    key = (wanted, device)
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load(wanted, device, model_dir if not reference_model else None)
        return _LOADED[key]


def _load(wanted: str, device: str, model_dir: str | None) -> ReferenceStatus:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return ReferenceStatus(False, f"{exc.name or 'torch/transformers'} is not installed (light install; "
                                      f"{EXTRA_HINT} adds the reference computation)")
    if model_dir is None:
        from capture_conformance.harness.protocol.ground_truth import locate_model_dir

        located = locate_model_dir(wanted)
        model_dir = str(located) if located is not None else None
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return ReferenceStatus(False, f"no local copy of {wanted!r} (not a directory with config.json, not in the "
                                      f"local Hugging Face cache; nothing is downloaded): pass --reference-model DIR")
    try:
        import torch
        from transformers import AutoModelForCausalLM

        # float32 whatever the server runs: the reference should be the most exact value
        # available; the tolerance covers the server's own dtype.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        model.to(device)
        model.eval()
    except Exception as exc:  # an unknown architecture, missing weights, a bad device name
        return ReferenceStatus(False, f"the reference model {model_dir} did not load on {device}: "
                                      f"{type(exc).__name__}: {str(exc)[:200]}")
    # The roles (block stack, head, final norm) from the loaded model itself, for the candidates of a diagnosis.
    reference = Reference(wanted, model_dir, device, "float32", model, layout_from_module(model))
    return ReferenceStatus(True, reference=reference)
