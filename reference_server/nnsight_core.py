"""The nnsight core: the only module of the server that imports nnsight.

It loads a model through ``nnsight.TransformersModel`` and runs one generation
with per-step capture of any set of savepoints. Everything nnsight-specific
lives here: the ``.save`` mount switched off, the execution order that keeps
``OutOfOrderError`` impossible, the per-step loop, ``tracer.result``.

Not thread-safe per model (nnsight 0.8 runs interventions as greenlets, and two
traces on one model at once fail): callers serialise calls per model, see
``registry.ModelWorker``.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# ``import nnsight`` would otherwise mount ``.save`` on every Python object, which
# breaks anyio's socket classes and with them every sync FastAPI endpoint.
os.environ.setdefault("NNSIGHT_CONFIG", str(Path(__file__).with_name("nnsight_config.yaml")))

import nnsight  # noqa: E402
import torch  # noqa: E402
from nnsight import TransformersModel  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

from .errors import Unprocessable  # noqa: E402
from .selectors import Selector  # noqa: E402


def _ensure_save_unmounted() -> None:
    """A user's own NNSIGHT_CONFIG may turn the mount back on: undo it."""
    if hasattr(object(), "save"):
        from nnsight import _c

        _c.unmount("save")


_ensure_save_unmounted()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    hidden_size: int
    num_layers: int
    dtype: str
    device: str


@dataclass(frozen=True)
class SavepointSite:
    """Where a selector lands: its rank in execution order and the per-token shape."""

    module_path: str
    io: str
    rank: int
    feature_shape: tuple[int, ...]  # the value's shape after [batch, position]


@dataclass(frozen=True)
class PlannedSavepoint:
    name: str
    selector: Selector
    site: SavepointSite


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    params: GenerationParams
    savepoints: list[PlannedSavepoint]
    tokens: str = "all"
    capture_dtype: torch.dtype = torch.float32
    on_token: Callable[[int], None] | None = None  # called from the worker thread per generated token
    # Set when the client is gone (registry.ModelWorker): the generation stops at its next step.
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)

    def batch_key(self):
        """Requests with equal keys may share one generate; None: run alone.

        Only greedy requests without stop strings are batched: one generate has one
        sampling configuration and one RNG (a seeded request must not depend on its
        neighbours), and stop strings would end other rows. max_tokens may differ.
        """
        if self.params.temperature > 0 or self.params.stop or self.on_token is not None:
            return None
        return ("greedy",)


@dataclass
class Generation:
    token_ids: list[int]  # the generated ids only
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [1, T, ...] on CPU
    hit_eos: bool = False


class _TokenStreamer:
    """transformers' streamer protocol: ``put`` gets the prompt first, then each step's token."""

    def __init__(self, on_token: Callable[[int], None]):
        self._on_token = on_token
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._on_token(int(token))

    def end(self) -> None:
        pass


class _StopWhenCancelled(StoppingCriteria):
    """A transformers stopping criterion: row i is done once its request's client is gone.

    Per row, so a batched neighbour of a cancelled request goes on; when every row
    is done, generate returns and the worker takes its next job.
    """

    def __init__(self, events: list[threading.Event]):
        self._events = events

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([e.is_set() for e in self._events], dtype=torch.bool, device=input_ids.device)


def _cancellable(kwargs: dict, events: list[threading.Event]) -> dict:
    return {**kwargs, "stopping_criteria": StoppingCriteriaList([_StopWhenCancelled(events)])}


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """One device-to-host copy per savepoint and request; on CUDA into pinned memory.

    A copy into pageable memory is staged by the driver and runs at a fraction of
    the bandwidth; pinned blocks come from torch's caching host allocator, so
    they are not re-registered on every request.
    """
    if tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    return host


def _first_tensor(value):
    """Modules may return tuples (attention: output, weights): the first item is the value."""
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value


class CaptureModel:
    """One loaded model and what is known about its modules."""

    def __init__(self, model_id: str, nn_model: TransformersModel):
        self.model_id = model_id
        self._nn = nn_model
        self._module: torch.nn.Module = nn_model._module
        self.tokenizer = nn_model.tokenizer
        config = self._module.config
        self.device = next(self._module.parameters()).device
        self.dtype = next(self._module.parameters()).dtype
        self.eos_token_ids = self._eos_ids()
        # Prompt + generated tokens beyond this are refused (service._check_context): past
        # it the positions are untrained, and a huge prompt holds the only worker for long.
        self.context_length = getattr(config, "max_position_embeddings", None)
        self.sites = self._scan_sites()
        lm_head = self.sites.get(("lm_head", "output"))
        self.info = ModelInfo(
            vocab_size=lm_head.feature_shape[-1] if lm_head else int(config.vocab_size),
            hidden_size=int(getattr(config, "hidden_size", 0)),
            num_layers=int(getattr(config, "num_hidden_layers", 0)),
            dtype=dtype_name(self.dtype),
            device=str(self.device),
        )

    @classmethod
    def load(cls, model_id: str, path: str, device: str = "auto", dtype: str = "auto") -> "CaptureModel":
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            torch_dtype = DTYPES[dtype]
        kwargs = {"dtype": torch_dtype}
        if device != "cpu":
            kwargs["device_map"] = device
        nn_model = TransformersModel(path, task="text-generation", dispatch=True, **kwargs)
        nn_model._module.eval()
        return cls(model_id, nn_model)

    def _eos_ids(self) -> set[int]:
        ids = getattr(self._module.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return set()
        return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}

    # -- module map ---------------------------------------------------------------

    def _scan_sites(self) -> dict[tuple[str, str], SavepointSite]:
        """Learn each module's execution order and per-token shape from one hooked forward.

        nnsight raises OutOfOrderError when an invoke asks for a module the model has
        already passed; sorting savepoints by this order makes that impossible. Only
        values laid out ``[batch, position, ...]`` can be captured per token, so the
        probe uses a sequence length no other dimension is likely to share.
        """
        probe_len = 7
        sites: dict[tuple[str, str], SavepointSite] = {}
        names = {module: name for name, module in self._module.named_modules()}
        handles = []

        def record(name: str, io: str, value) -> None:
            if (name, io) in sites:
                return  # a module run twice per forward keeps its first position
            value = _first_tensor(value)
            if not torch.is_tensor(value) or value.dim() < 2 or value.shape[:2] != (1, probe_len):
                return
            sites[(name, io)] = SavepointSite(name, io, len(sites), tuple(value.shape[2:]))

        for module, name in names.items():
            handles.append(
                module.register_forward_pre_hook(
                    lambda mod, args, kwargs, n=name: record(n, "input", args[0] if args else None),
                    with_kwargs=True,
                )
            )
            handles.append(module.register_forward_hook(lambda mod, args, out, n=name: record(n, "output", out)))
        try:
            ids = torch.zeros((1, probe_len), dtype=torch.long, device=self.device)
            with torch.inference_mode():
                self._module(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
        sites.pop(("", "input"), None)  # the root takes ids, not activations
        sites.pop(("", "output"), None)
        return sites

    def site(self, selector: Selector) -> SavepointSite:
        found = self.sites.get((selector.module_path, selector.io))
        if found is None:
            if self._is_module(selector.module_path):
                raise Unprocessable(f"selector {selector.text!r} has no per-token tensor {selector.io}")
            raise Unprocessable(f"selector {selector.text!r} names no module of this model")
        return found

    def _is_module(self, path: str) -> bool:
        try:
            self._module.get_submodule(path)  # walks _modules only: no attribute access
            return True
        except AttributeError:
            return False

    def savepoint_catalogue(self) -> list[str]:
        """Selectors a client can ask for, in execution order."""
        ordered = sorted(self.sites.values(), key=lambda s: s.rank)
        return [f"{s.module_path}.{s.io}" if s.io == "input" else s.module_path for s in ordered]

    def _envoy(self, module_path: str):
        envoy = self._nn
        for part in module_path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    # -- generation ---------------------------------------------------------------

    def _generate_kwargs(self, params: GenerationParams) -> dict:
        kwargs: dict = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self._pad_id()}
        if params.temperature > 0:
            # OpenAI has no top-k: switch off any top_k a model's generation_config brings.
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kwargs

    def _pad_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else next(iter(sorted(self.eos_token_ids)), None)

    def generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        savepoints: list[PlannedSavepoint],
        tokens: str = "all",
        capture_dtype: torch.dtype = torch.float32,
        on_token: Callable[[int], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> Generation:
        """Generate from ``prompt_ids``, capturing each savepoint at every step's last position."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        kwargs = self._generate_kwargs(params)
        if cancelled is not None:
            kwargs = _cancellable(kwargs, [cancelled])
        if on_token is not None:
            kwargs["streamer"] = _TokenStreamer(on_token)
        if not savepoints:
            with torch.inference_mode():
                out = self._module.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            return self._finish(out[0, len(prompt_ids):].tolist(), {})
        ordered = sorted(savepoints, key=lambda sp: sp.site.rank)
        sites = [(self._envoy(sp.site.module_path), sp.site.io) for sp in ordered]
        steps = params.max_new_tokens
        with warnings.catch_warnings():
            # An open step loop ends when the model stops early (EOS, stop string);
            # nnsight warns that the remaining steps were "never reached". Expected here.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with self._nn.generate(**kwargs) as tracer:
                captured = nnsight.save([[] for _ in ordered])
                with tracer.invoke(input_ids):
                    for _step in tracer.iter[:steps]:
                        for slot, (envoy, io) in enumerate(sites):
                            value = _first_tensor(envoy.output if io == "output" else envoy.input)
                            # Clone: a slice is a view that would keep the whole step tensor alive.
                            per_token = value[:, -1].detach().to(capture_dtype, copy=True)
                            if tokens == "all" or not captured[slot]:
                                captured[slot].append(per_token)
                            elif tokens == "last":
                                captured[slot][0] = per_token
                # A second, empty invoke still runs when the loop above ended early.
                with tracer.invoke():
                    result = nnsight.save(tracer.result)
        new_ids = result[0, len(prompt_ids):].tolist()
        tensors = {}
        for sp, steps_captured in zip(ordered, captured):
            expected = len(new_ids) if tokens == "all" else 1
            if len(steps_captured) != expected:
                raise RuntimeError(
                    f"captured {len(steps_captured)} steps of {sp.name!r} for {len(new_ids)} generated tokens"
                )
            tensors[sp.name] = _to_host(torch.stack(steps_captured, dim=1))
        return self._finish(new_ids, tensors)

    def generate_batch(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Serve several compatible requests (same ``batch_key``) with one generate.

        One nnsight invoke per request: each invoke sees only its own row, so each
        request's tensors are those of its solo run within float rounding (prompts are
        left-padded, and the attention mask hides the padding). Rows that end early
        (EOS, their own max_tokens) are cut back to their own N afterwards.
        """
        if len(requests) == 1:
            r = requests[0]
            return [self.generate(r.prompt_ids, r.params, r.savepoints, r.tokens, r.capture_dtype, r.on_token,
                                  r.cancelled)]
        from dataclasses import replace

        steps = max(r.params.max_new_tokens for r in requests)
        plans = [sorted(r.savepoints, key=lambda sp: sp.site.rank) for r in requests]
        sites = [[(self._envoy(sp.site.module_path), sp.site.io) for sp in plan] for plan in plans]
        inputs = [torch.tensor([r.prompt_ids], dtype=torch.long, device=self.device) for r in requests]
        limits = [r.params.max_new_tokens for r in requests]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            kwargs = _cancellable(self._generate_kwargs(replace(requests[0].params, max_new_tokens=steps)),
                                  [r.cancelled for r in requests])
            with self._nn.generate(**kwargs) as tracer:
                captured = nnsight.save([[[] for _ in plan] for plan in plans])
                for row, (input_ids, row_sites, limit) in enumerate(zip(inputs, sites, limits)):
                    with tracer.invoke(input_ids):
                        for _step in tracer.iter[:limit]:
                            for slot, (envoy, io) in enumerate(row_sites):
                                value = _first_tensor(envoy.output if io == "output" else envoy.input)
                                captured[row][slot].append(value[:, -1].detach().to(requests[row].capture_dtype, copy=True))
                with tracer.invoke():
                    result = nnsight.save(tracer.result)
        prompt_width = max(len(r.prompt_ids) for r in requests)
        generations = []
        for row, request in enumerate(requests):
            new_ids = result[row, prompt_width:][: request.params.max_new_tokens].tolist()
            end = next((i + 1 for i, t in enumerate(new_ids) if t in self.eos_token_ids), len(new_ids))
            new_ids = new_ids[:end]  # after its EOS a row only holds padding
            tensors = {}
            for sp, steps_captured in zip(plans[row], captured[row]):
                if len(steps_captured) < len(new_ids):
                    raise RuntimeError(f"captured {len(steps_captured)} steps of {sp.name!r} for {len(new_ids)} tokens")
                chosen = {"all": steps_captured[: len(new_ids)], "first": steps_captured[:1],
                          "last": steps_captured[len(new_ids) - 1 : len(new_ids)]}[request.tokens]
                tensors[sp.name] = _to_host(torch.stack(chosen, dim=1))
            generations.append(self._finish(new_ids, tensors))
        return generations

    def _finish(self, new_ids: list[int], tensors: dict[str, torch.Tensor]) -> Generation:
        hit_eos = bool(new_ids) and new_ids[-1] in self.eos_token_ids
        return Generation(token_ids=new_ids, tensors=tensors, hit_eos=hit_eos)
