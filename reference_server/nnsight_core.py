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

import inspect
import os
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

# ``import nnsight`` would otherwise mount ``.save`` on every Python object, which
# breaks anyio's socket classes and with them every sync FastAPI endpoint.
os.environ.setdefault("NNSIGHT_CONFIG", str(Path(__file__).with_name("nnsight_config.yaml")))

import nnsight  # noqa: E402
import torch  # noqa: E402
from nnsight import TransformersModel  # noqa: E402
from transformers import (  # noqa: E402
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .errors import Unprocessable  # noqa: E402
from .selectors import LOGITS, Selector, parse_selector  # noqa: E402
from .types import (  # noqa: E402
    DTYPES,
    Generation,
    GenerationParams,
    GenerationRequest,
    ModelInfo,
    PlannedSavepoint,
    SavepointSite,
    dtype_name,
)


def _ensure_save_unmounted() -> None:
    """A user's own NNSIGHT_CONFIG may turn the mount back on: undo it."""
    if hasattr(object(), "save"):
        from nnsight import _c

        _c.unmount("save")


_ensure_save_unmounted()

class _TokenStreamer:
    """transformers' streamer protocol: ``put`` gets the prompt first, then each step's token.

    With a one-step-late stop, the token of the extra step is not part of the completion:
    the criterion has recorded the real length before that token is put, and it is dropped.
    """

    def __init__(self, on_token: Callable[[int], None], late_stop: "_StopOneStepLate | None" = None):
        self._on_token = on_token
        self._late_stop = late_stop
        self._prompt_seen = False
        self._count = 0

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            ended = self._late_stop.ended_at[0] if self._late_stop is not None else None
            if ended is not None and self._count >= ended:
                return
            self._count += 1
            self._on_token(int(token))

    def end(self) -> None:
        pass


class _StopOneStepLate(StoppingCriteria):
    """Every stop condition of a generation (max_tokens per row, EOS, stop strings), one step late.

    ``sequence`` capture needs the module values with the last completion token as
    input, and generation never feeds that token. Reporting "done" one step after the
    real end makes generate run exactly one more forward step, over that token, with
    the KV cache (transformers itself defers its stop check the same way on some
    devices). ``ended_at[row]`` is the row's real number of generated tokens; what the
    extra step generates is dropped. ``eos_token_id`` marks this as an EOS criterion
    for generate, so rows that are done are padded while others go on.
    """

    def __init__(self, prompt_width: int, limits: list[int], eos_ids: set[int], stop_strings=None, tokenizer=None):
        self.eos_token_id = sorted(eos_ids)
        self._eos = torch.tensor(self.eos_token_id, dtype=torch.long)
        self._prompt_width = prompt_width
        self._limits = torch.tensor(limits, dtype=torch.long)
        self._strings = StopStringCriteria(tokenizer, stop_strings) if stop_strings else None
        self.ended_at: list[int | None] = [None] * len(limits)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        length = input_ids.shape[1] - self._prompt_width
        ends = self._limits.to(input_ids.device) <= length
        if len(self._eos):
            ends |= torch.isin(input_ids[:, -1], self._eos.to(input_ids.device))
        if self._strings is not None:
            ends |= self._strings(input_ids, scores)
        done = []
        for row, end in enumerate(ends.tolist()):
            done.append(self.ended_at[row] is not None)
            if end and self.ended_at[row] is None:
                self.ended_at[row] = length
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _StopWhenCancelled(StoppingCriteria):
    """A transformers stopping criterion: row i is done once its request's client is gone.

    Per row, so a batched neighbour of a cancelled request goes on; when every row
    is done, generate returns and the worker takes its next job.
    """

    def __init__(self, events: list[threading.Event]):
        self._events = events

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([e.is_set() for e in self._events], dtype=torch.bool, device=input_ids.device)


class _SampleWithOwnGenerators(LogitsProcessor):
    """Sampling from one random generator per row, never the process-wide one.

    ``torch.manual_seed`` seeds the generator that every model's worker thread shares:
    a seeded request would then depend on what other models sample meanwhile. Here
    each row draws from its own ``torch.Generator`` by the Gumbel-max trick:
    ``argmax(log_softmax(scores) + Gumbel noise)`` is an exact sample of
    ``softmax(scores)``, so generate runs greedy (``do_sample=False``) over these
    scores, after the temperature and top-p warpers, and samples all the same.
    Only the chosen token changes: the model's logits, hence every capture, are untouched.
    """

    def __init__(self, generators: list[torch.Generator]):
        self._generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float(), dim=-1)
        # -log(E) with E ~ Exp(1) is a standard Gumbel variable; exponential_ takes a generator.
        noise = torch.stack([torch.empty(scores.shape[-1], device=scores.device).exponential_(generator=g)
                             for g in self._generators])
        return logp - noise.log()


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a non-deterministic seed of its own, not one drawn from shared state
    else:
        generator.manual_seed(seed)
    return generator


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


def _unflatten(value: torch.Tensor, row: int, rows: int) -> torch.Tensor:
    """Row ``row`` of a flattened ``[rows * positions, ...]`` value, as ``[1, positions, ...]``.

    nnsight hands each invoke its own rows of a value whose leading size is the batch's row
    count: a decode step's ``[rows * 1, ...]`` is already this invoke's ``[1, ...]``. Any
    other flattened value comes whole, rows one after another.
    """
    if value.shape[0] == 1:
        return value.reshape(1, 1, *value.shape[1:])
    return value.reshape(rows, value.shape[0] // rows, *value.shape[1:])[row:row + 1]


def _wants_step(entries: list, request: GenerationRequest, solo: bool) -> bool:
    """Whether this step's value of a savepoint is kept, given the chunks kept so far."""
    if entries and request.positions == "prompt":
        return False  # the prompt is all in step 0
    return not (solo and entries and request.tokens == "first")


def _keep_step(value: torch.Tensor, entries: list, request: GenerationRequest, solo: bool) -> None:
    """Keep this step's chunk of one savepoint's value (``[1, positions, ...]``, this request's row).

    The one per-step capture rule, shared by the nnsight trace and the hooked fast path.
    """
    if request.positions != "generated" and not entries:
        # Left padding in a batch: this row's prompt is the rightmost prompt_len positions.
        chunk = value[:, value.shape[1] - len(request.prompt_ids):]
    else:
        chunk = value[:, -1:]
    # Clone: a slice is a view that would keep the whole step tensor alive.
    chunk = chunk.detach().to(request.capture_dtype, copy=True)
    if solo and entries and request.tokens == "last":
        entries[-1] = chunk  # bounded memory: only the newest step is kept
    else:
        entries.append(chunk)


class CaptureModel:
    """One loaded model and what is known about its modules."""

    # Solo requests whose savepoints are all plain module outputs skip the nnsight trace
    # (see _hooked); False sends every capture through nnsight (the tests compare both).
    fast_path: bool = True

    def __init__(self, model_id: str, nn_model: TransformersModel):
        self.model_id = model_id
        self._nn = nn_model
        self._module: torch.nn.Module = nn_model._module
        self.tokenizer = nn_model.tokenizer
        # A multimodal wrapper keeps the language model's numbers in a text config.
        config = self._module.config.get_text_config() if hasattr(self._module.config, "get_text_config") \
            else self._module.config
        self.device = next(self._module.parameters()).device
        self.dtype = next(self._module.parameters()).dtype
        self.eos_token_ids = self._eos_ids()
        # Prompt + generated tokens beyond this are refused (service._check_context): past
        # it the positions are untrained, and a huge prompt holds the only worker for long.
        # (transformers' attribute_map answers the common names: GPT-2's n_positions, n_embd, n_layer.)
        self.context_length = getattr(config, "max_position_embeddings", None)
        self.sites = self._scan_sites()
        self._called_once = self._modules_called_once()
        self.block_stack = self._block_stack()
        self.head_path = self._head_path(getattr(config, "vocab_size", None))
        # Protocol aliases, bound to this model's own modules: ``logits`` is its output head.
        self.aliases = {LOGITS: self.head_path} if self.head_path is not None else {}
        head = self.sites.get((self.head_path, "output"))
        self.info = ModelInfo(
            vocab_size=head.feature_shape[-1] if head else int(getattr(config, "vocab_size", 0) or 0),
            hidden_size=int(getattr(config, "hidden_size", None) or self._block_width() or 0),
            num_layers=int(getattr(config, "num_hidden_layers", None) or len(self._blocks()) or 0),
            dtype=dtype_name(self.dtype),
            device=str(self.device),
        )

    @classmethod
    def load(cls, model_id: str, path: str, device: str = "auto", dtype: str = "auto",
             tp_plan: str | None = None) -> "CaptureModel":
        """``tp_plan="auto"``: this process is one rank of a tensor-parallel group (see distributed.py)."""
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            torch_dtype = DTYPES[dtype]
        kwargs = {"dtype": torch_dtype}
        if tp_plan is not None:
            kwargs["tp_plan"] = tp_plan  # transformers places this rank's shard itself (cuda:LOCAL_RANK or cpu)
        elif device != "cpu":
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
        full = self._probe_shapes(probe_len)
        # Some blocks flatten [batch, position, D] to [batch * position, D] inside (OPT's fc1/fc2):
        # a second probe of two rows tells those rows apart from values of any other layout.
        maybe_flat = [key for key, shape in full.items() if len(shape) >= 2 and shape[0] == probe_len]
        two_rows = self._probe_shapes(probe_len, rows=2) if maybe_flat else {}
        sites: dict[tuple[str, str], SavepointSite] = {}
        for key, shape in full.items():
            if len(shape) >= 2 and shape[:2] == (1, probe_len):
                sites[key] = SavepointSite(key[0], key[1], len(sites), tuple(shape[2:]))
            elif key in maybe_flat and two_rows.get(key) == (2 * probe_len, *shape[1:]):
                sites[key] = SavepointSite(key[0], key[1], len(sites), tuple(shape[1:]), flat=True)
        sites.pop(("", "input"), None)  # the root takes ids, not activations
        sites.pop(("", "output"), None)
        if "logits_to_keep" in inspect.signature(self._module.forward).parameters:
            # generate passes logits_to_keep=1: find the sites that then hold the last position only.
            kept = self._probe_shapes(probe_len, logits_to_keep=1)
            for key, site in sites.items():
                if key in kept and kept[key][0 if site.flat else 1:][:1] != (probe_len,):
                    sites[key] = replace(site, last_only=True)
        return sites

    def _modules_called_once(self) -> set[str]:
        """Paths of the modules that run exactly once per forward (a shared module may run twice)."""
        counts: dict[str, int] = {}
        handles = [module.register_forward_hook(lambda mod, args, out, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
                   for name, module in self._module.named_modules()]
        try:
            with torch.inference_mode():
                self._module(input_ids=torch.zeros((1, 7), dtype=torch.long, device=self.device))
        finally:
            for handle in handles:
                handle.remove()
        return {name for name, count in counts.items() if count == 1}

    def _probe_shapes(self, probe_len: int, rows: int = 1, **forward_kwargs) -> dict[tuple[str, str], tuple[int, ...]]:
        """(module path, "input"/"output") -> the value's shape, in execution order, from one hooked forward."""
        shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        handles = []

        def record(name: str, io: str, value) -> None:
            if (name, io) in shapes:
                return  # a module run twice per forward keeps its first position
            value = _first_tensor(value)
            if torch.is_tensor(value):
                shapes[(name, io)] = tuple(value.shape)

        for name, module in self._module.named_modules():
            handles.append(
                module.register_forward_pre_hook(
                    lambda mod, args, kwargs, n=name: record(n, "input", args[0] if args else None),
                    with_kwargs=True,
                )
            )
            handles.append(module.register_forward_hook(lambda mod, args, out, n=name: record(n, "output", out)))
        try:
            ids = torch.zeros((rows, probe_len), dtype=torch.long, device=self.device)
            with torch.inference_mode():
                self._module(input_ids=ids, **forward_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return shapes

    def _path_of(self, module) -> str | None:
        return next((name for name, m in self._module.named_modules() if m is module), None)

    def _head_path(self, vocab_size: int | None) -> str | None:
        """The output head's module path: ``get_output_embeddings()``, else the last module with vocabulary-wide output."""
        getter = getattr(self._module, "get_output_embeddings", None)
        head = getter() if getter is not None else None
        path = self._path_of(head) if head is not None else None
        if path:
            return path
        if vocab_size:
            wide = [s for s in self.sites.values() if s.io == "output" and s.feature_shape == (vocab_size,)]
            if wide:
                return max(wide, key=lambda s: s.rank).module_path
        return None

    def _block_stack(self) -> str | None:
        """The path of the decoder blocks' ModuleList: the one holding the model's ``_no_split_modules`` classes,
        else the longest ModuleList of one repeated class (``transformer.h``, ``gpt_neox.layers``, ``model.layers``)."""
        named = set(getattr(self._module, "_no_split_modules", None) or ())
        best, best_len = None, 0
        for name, module in self._module.named_modules():
            if not isinstance(module, torch.nn.ModuleList) or not len(module):
                continue
            kinds = {type(child).__name__ for child in module}
            if kinds & named:
                return name
            if len(kinds) == 1 and len(module) > best_len:
                best, best_len = name, len(module)
        return best

    def _blocks(self) -> list[torch.nn.Module]:
        return list(self._module.get_submodule(self.block_stack)) if self.block_stack else []

    def _block_width(self) -> int | None:
        blocks = self._blocks()
        site = self.sites.get((f"{self.block_stack}.0", "output")) if blocks else None
        return site.feature_shape[-1] if site and site.feature_shape else None

    def site(self, selector: Selector) -> SavepointSite:
        # Bound to this model again: a selector parsed without it reads ``logits`` by the protocol's old name.
        selector = parse_selector(selector.text, self.aliases)
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

    def _generate_kwargs(self, params: GenerationParams, rows: list[GenerationParams] | None = None) -> dict:
        """generate's arguments for ``params``; ``rows``: each row's own parameters (its seed)."""
        kwargs: dict = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self._pad_id(),
                        # OpenAI has no top-k: switch off any top_k a model's generation_config brings.
                        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if params.temperature > 0:
            # Sampling by our own processors: a generator per row (see _SampleWithOwnGenerators).
            processors = [TemperatureLogitsWarper(params.temperature)]
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            generators = [_generator(row.seed, self.device) for row in (rows or [params])]
            processors.append(_SampleWithOwnGenerators(generators))
            kwargs["logits_processor"] = LogitsProcessorList(processors)
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
        positions: str = "generated",
        cancelled: threading.Event | None = None,
    ) -> Generation:
        """Generate from ``prompt_ids``, capturing each savepoint at the asked ``positions``."""
        if not savepoints:
            input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
            kwargs = self._generate_kwargs(params)
            if cancelled is not None:
                kwargs = _cancellable(kwargs, [cancelled])
            if on_token is not None:
                kwargs["streamer"] = _TokenStreamer(on_token)
            with torch.inference_mode():
                out = self._module.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            return self._finish(out[0, len(prompt_ids):].tolist(), {})
        request = GenerationRequest(prompt_ids, params, savepoints, tokens, capture_dtype, on_token, positions,
                                    cancelled if cancelled is not None else threading.Event())
        return self._traced([request])[0]

    def generate_batch(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Serve several compatible requests (same ``batch_key``) with one generate.

        One nnsight invoke per request: each invoke sees only its own row, so each
        request's tensors are those of its solo run within float rounding (prompts are
        left-padded, and the attention mask hides the padding). Rows that end early
        (EOS, their own max_tokens) are cut back to their own N afterwards.
        """
        if len(requests) == 1 and not requests[0].savepoints:
            r = requests[0]
            return [self.generate(r.prompt_ids, r.params, r.savepoints, r.tokens, r.capture_dtype, r.on_token,
                                  r.positions, r.cancelled)]
        return self._traced(requests)

    def _traced(self, requests: list[GenerationRequest]) -> list[Generation]:
        """One nnsight generate for one request, or for a batch of compatible ones (one invoke each).

        Positions (all inside this one trace):
        - ``generated``: the last position of steps 0..N-1;
        - ``prompt``: every prompt position of step 0 (the prefill pass holds them all);
        - ``sequence``: step 0's prompt positions, then the last position of steps 1..N.
          Step N feeds the last completion token, which generation never does on its
          own: its stop conditions are applied one step late (``_StopOneStepLate``), so
          it costs one more forward step, and the token that step produces is dropped.
        With transformers 5, the output head (and anything after the slice in the model's
        forward) sees the last position only (``logits_to_keep=1``); prompt positions of
        such a site need ``logits_to_keep=0``, asked for only when one is captured.
        """
        solo = len(requests) == 1
        late, width, limits, kwargs, stopper = self._traced_kwargs(requests)
        plans = [sorted(r.savepoints, key=lambda sp: sp.site.rank) for r in requests]
        if self.fast_path and solo and self._hookable(plans[0]):
            return [self._hooked(requests[0], plans[0], kwargs, stopper, late, width, limits)]
        sites = [[(self._envoy(sp.site.module_path), sp.site.io, sp.site.flat) for sp in plan] for plan in plans]
        inputs = [torch.tensor([r.prompt_ids], dtype=torch.long, device=self.device) for r in requests]
        with warnings.catch_warnings():
            # An open step loop ends when the model stops early (EOS, stop string);
            # nnsight warns that the remaining steps were "never reached". Expected here.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with self._nn.generate(**kwargs) as tracer:
                captured = nnsight.save([[[] for _ in plan] for plan in plans])
                for row, (input_ids, row_sites, request) in enumerate(zip(inputs, sites, requests)):
                    steps = request.params.max_new_tokens + (1 if late else 0)
                    with tracer.invoke(input_ids):
                        for _step in tracer.iter[:steps]:
                            for slot, (envoy, io, flat) in enumerate(row_sites):
                                entries = captured[row][slot]
                                if not _wants_step(entries, request, solo):
                                    continue  # skipped before .output: nnsight then does not wait for the module
                                value = _first_tensor(envoy.output if io == "output" else envoy.input)
                                if flat:
                                    value = _unflatten(value, row, len(requests))
                                _keep_step(value, entries, request, solo)
                # A second, empty invoke still runs when the loops above ended early.
                with tracer.invoke():
                    result = nnsight.save(tracer.result)
        return [self._generation(row, request, result, plans[row], captured[row], stopper, late, width, limits, solo)
                for row, request in enumerate(requests)]

    def _traced_kwargs(self, requests: list[GenerationRequest]):
        """generate's arguments for these requests, the same for the nnsight trace and the hooked fast path."""
        first = requests[0]
        late = first.positions == "sequence"  # batch_key keeps sequence and other requests apart
        width = max(len(r.prompt_ids) for r in requests)
        limits = [r.params.max_new_tokens for r in requests]
        kwargs = self._generate_kwargs(replace(first.params, max_new_tokens=max(limits)),
                                       [r.params for r in requests])
        stopper = None
        if late:
            stopper = _StopOneStepLate(width, limits, self.eos_token_ids, kwargs.pop("stop_strings", None),
                                       kwargs.pop("tokenizer", None))
            # The criterion above owns every stop condition; generate's own must never fire first.
            kwargs.update(max_new_tokens=max(limits) + 1, eos_token_id=[])
        # A request whose client is gone stops at its next step (per row: batched neighbours go on).
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            ([stopper] if stopper is not None else []) + [_StopWhenCancelled([r.cancelled for r in requests])])
        if first.on_token is not None:
            kwargs["streamer"] = _TokenStreamer(first.on_token, stopper)
        if any(r.needs_all_logits() for r in requests):
            kwargs["logits_to_keep"] = 0
        return late, width, limits, kwargs, stopper

    def _generation(self, row, request, result, plan, captured, stopper, late, width, limits, solo) -> Generation:
        """Row ``row`` of a generate's ``result`` and its captured chunks, cut to the request."""
        if late:
            ended = stopper.ended_at[row]
            new_ids = result[row, width:width + (ended if ended is not None else limits[row])].tolist()
        else:
            new_ids = result[row, width:][: request.params.max_new_tokens].tolist()
            end = next((i + 1 for i, t in enumerate(new_ids) if t in self.eos_token_ids), len(new_ids))
            new_ids = new_ids[:end]  # after its EOS a row only holds padding
        if request.cancelled.is_set():  # nobody will read it: no tensors to cut or copy
            return self._finish(new_ids, {})
        tensors = {sp.name: _to_host(self._select(sp, entries, request, len(new_ids), solo))
                   for sp, entries in zip(plan, captured)}
        return self._finish(new_ids, tensors)

    # -- the fast path: forward hooks instead of an nnsight trace ------------------

    def _hookable(self, plan: list[PlannedSavepoint]) -> bool:
        """Whether every savepoint is a plain module output that forward hooks see as nnsight does.

        Covered: a module's output (first tensor of a tuple), laid out [batch, position, ...],
        from a module called exactly once per forward. Anything else (inputs, flattened values,
        modules called several times per forward) goes through nnsight.
        """
        return all(sp.site.io == "output" and not sp.site.flat and sp.site.module_path in self._called_once
                   for sp in plan)

    def _hooked(self, request: GenerationRequest, plan: list[PlannedSavepoint], kwargs: dict, stopper, late: bool,
                width: int, limits: list[int]) -> Generation:
        """One solo request served by plain ``generate`` with a forward hook per savepoint.

        nnsight's per-step interleave (a greenlet switch at every module a savepoint waits
        for, every step) is most of capture's cost on a small model. Each hook hands the
        module's output to the same per-step code as the nnsight loop (``_wants_step``,
        ``_keep_step``), on the same generate arguments, so the values are the same, bit
        for bit (tests/test_fast_path.py compares both paths).
        """
        steps = request.params.max_new_tokens + (1 if late else 0)
        captured: list[list] = [[] for _ in plan]
        calls = [0] * len(plan)
        handles = []
        # All-token captures of generated positions: each step's last position is copied into one
        # buffer of every step, made at the first (no allocation per step, no stack at the end:
        # 4.5 ms instead of 9.4 for a 32-step head capture, docs/performance.md). The values are
        # _keep_step's: the same slice, the same conversion to the capture dtype.
        into_buffer = request.tokens == "all" and request.positions == "generated"
        buffers: list[torch.Tensor | None] = [None] * len(plan)
        kept = [0] * len(plan)

        def hook_for(slot: int):
            def hook(module, args, output) -> None:
                calls[slot] += 1
                if calls[slot] > steps:  # nnsight's tracer.iter[:steps] stops there too
                    return
                value = _first_tensor(output)
                if into_buffer:
                    if buffers[slot] is None:
                        buffers[slot] = torch.empty((value.shape[0], steps, *value.shape[2:]),
                                                    dtype=request.capture_dtype, device=value.device)
                    buffers[slot][:, kept[slot]].copy_(value[:, -1].detach())
                    kept[slot] += 1
                elif _wants_step(captured[slot], request, True):
                    _keep_step(value, captured[slot], request, True)
            return hook

        try:
            for slot, sp in enumerate(plan):
                handles.append(self._module.get_submodule(sp.site.module_path).register_forward_hook(hook_for(slot)))
            input_ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
            with torch.no_grad():
                result = self._module.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if into_buffer:  # _select cuts the one chunk to the tokens generated (a copy only when fewer)
            captured = [[buffer[:, :n]] if buffer is not None else [] for buffer, n in zip(buffers, kept)]
        return self._generation(0, request, result, plan, captured, stopper, late, width, limits, True)

    @staticmethod
    def _select(sp: PlannedSavepoint, entries: list, request: GenerationRequest, n: int, solo: bool) -> torch.Tensor:
        """The captured chunks of one savepoint cut to the request's positions and tokens: ``[1, T, ...]``."""
        prompt_len = len(request.prompt_ids)
        if request.tokens == "last":
            if solo and request.positions != "prompt":
                return entries[-1][:, -1:].clone()  # only the newest step was kept, and it is the last one
            # The last position is that of one step: step 0 (prompt), N-1 (generated), N (sequence).
            step = {"prompt": 0, "generated": n - 1, "sequence": n}[request.positions]
            if len(entries) <= step:
                raise RuntimeError(f"captured {len(entries)} steps of {sp.name!r}, the last position is step {step}")
            return entries[step][:, -1:].clone()
        whole = torch.cat(entries, dim=1) if len(entries) > 1 else entries[0]
        want = {"generated": n, "prompt": prompt_len, "sequence": prompt_len + n}[request.positions]
        if request.tokens == "first":
            want = 1
        if whole.shape[1] < want:
            raise RuntimeError(f"captured {whole.shape[1]} positions of {sp.name!r} for {want} "
                               f"({request.positions}, {n} generated tokens)")
        chosen = whole[:, :want]
        # A slice is a view: saved as is, it would write the whole capture's storage.
        return chosen.clone() if chosen.untyped_storage().nbytes() > chosen.nbytes else chosen

    def _finish(self, new_ids: list[int], tensors: dict[str, torch.Tensor]) -> Generation:
        hit_eos = bool(new_ids) and new_ids[-1] in self.eos_token_ids
        return Generation(token_ids=new_ids, tensors=tensors, hit_eos=hit_eos)
