"""Deliberate bugs, for proving that the conformance suites catch them.

Each fault is one realistic defect seen in deployed capture servers or that
follows from nnsight's footguns. Test code only: ``tests/faulty_server.py``
builds the reference app with ``create_app`` and installs one fault on the
pieces it wired together; the shipped server knows nothing of them.

A fault replaces one seam of the server (see ``CaptureService``'s seams, the
registry, the readiness flag or the app) by wrapping it, so the rest of the
server stays correct and the suites must find the one thing that is wrong.
Each entry names the suite area that must catch it (checked by
``tests/test_fault_matrix.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch
from fastapi import Request
from fastapi.responses import JSONResponse

from capture_conformance.reference_server.errors import CaptureError, Unprocessable


@dataclass(frozen=True)
class Fault:
    name: str
    area: str  # the suite module (suites/test_<area>.py) that must catch it
    description: str
    install: Callable


FAULTS: dict[str, Fault] = {}


def fault(name: str, area: str, description: str):
    def register(install: Callable) -> Callable:
        FAULTS[name] = Fault(name, area, description, install)
        return install

    return register


@dataclass
class Target:
    """What a fault may change: the pieces create_app wires together."""

    app: object
    service: object
    registry: object
    readiness: object


def install(name: str, target: Target) -> None:
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; known: {sorted(FAULTS)}")
    FAULTS[name].install(target)


def _wrap_generate(target: Target, change: Callable) -> None:
    """Replace the service's generate seam by one that edits its result: change(generation, plan, options)."""
    original = target.service._generate

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        generation = await original(worker, prompt_ids, params, plan, options, **kw)
        change(generation, plan, options)
        return generation

    target.service._generate = generate


def _wrap_store(target: Target, change: Callable) -> None:
    """Replace the store seam by one that edits the capture fields: change(fields, generation, plan, options)."""
    original = target.service._store

    def store(generation, plan, options):
        fields = original(generation, plan, options)
        change(fields, generation, plan, options)
        return fields

    target.service._store = store


def _wrap_response(target: Target, change: Callable) -> None:
    original = target.service.chat_completion

    async def chat_completion(req):
        response = await original(req)
        change(response, req)
        return response

    target.service.chat_completion = chat_completion


# -- capture values -------------------------------------------------------------


@fault("first_step_only", "multi_token", "captures only the first step: [1,1,V] whatever `tokens` says")
def _first_step_only(t: Target) -> None:
    def change(gen, plan, options):
        gen.tensors = {n: x[:, :1] for n, x in gen.tensors.items()}

    _wrap_generate(t, change)


@fault("shifted_logits", "multi_token", "step i holds step i+1, the last step duplicated")
def _shifted(t: Target) -> None:
    def change(gen, plan, options):
        gen.tensors = {n: torch.cat([x[:, 1:], x[:, -1:]], dim=1) for n, x in gen.tensors.items()}

    _wrap_generate(t, change)


@fault("truncated_hidden", "savepoints", "hidden features silently truncated to the first 128")
def _truncated(t: Target) -> None:
    def change(gen, plan, options):
        hidden = {sp.name for sp in plan if not _is_logits(t, sp.site)}
        gen.tensors = {n: x[..., :128] if n in hidden else x for n, x in gen.tensors.items()}

    _wrap_generate(t, change)


@fault("nan_values", "dtype_size", "NaNs written into the stored tensor")
def _nans(t: Target) -> None:
    def change(gen, plan, options):
        for x in gen.tensors.values():
            x[0, -1, : max(1, x.shape[-1] // 7)] = float("nan")

    _wrap_generate(t, change)


@fault("swapped_names", "savepoints", "two savepoints' names swapped")
def _swapped(t: Target) -> None:
    def change(gen, plan, options):
        names = list(gen.tensors)
        if len(names) >= 2:
            a, b = names[0], names[1]
            gen.tensors[a], gen.tensors[b] = gen.tensors[b], gen.tensors[a]

    _wrap_generate(t, change)


@fault("state_leak", "out_of_order", "the previous request's tensors returned again")
def _state_leak(t: Target) -> None:
    previous: dict[str, torch.Tensor] = {}

    def change(gen, plan, options):
        fresh = dict(gen.tensors)
        gen.tensors = {n: previous.get(n, x) for n, x in gen.tensors.items()}
        previous.clear()
        previous.update(fresh)

    _wrap_generate(t, change)


@fault("last_is_first", "single_token", "`tokens: \"last\"` returns step 0")
def _last_is_first(t: Target) -> None:
    original = t.service._generate

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        if options.tokens == "last":
            options = options.model_copy(update={"tokens": "first"})
        return await original(worker, prompt_ids, params, plan, options, **kw)

    t.service._generate = generate


@fault("input_is_output", "savepoints", "`.input` savepoints hold the module's output")
def _input_is_output(t: Target) -> None:
    from capture_conformance.reference_server.types import PlannedSavepoint

    original = t.service._plan

    def plan(model, savepoints):
        planned = original(model, savepoints)
        out = []
        for sp in planned:
            if sp.site.io == "input":
                other = model.sites.get((sp.site.module_path, "output"), sp.site)
                sp = PlannedSavepoint(name=sp.name, selector=sp.selector, site=other)
            out.append(sp)
        return out

    t.service._plan = plan


# -- metadata and files -----------------------------------------------------------


@fault("bf16_file_fp32_meta", "dtype_size", "file stored as bfloat16 while the metadata says float32")
def _bf16_file(t: Target) -> None:
    original = t.service._store

    def store(gen, plan, options):
        # Only float32 captures are affected: the server "saves space" and keeps the metadata it meant.
        lied = {n for n, x in gen.tensors.items() if x.dtype == torch.float32}
        gen.tensors = {n: x.to(torch.bfloat16) if n in lied else x for n, x in gen.tensors.items()}
        fields = original(gen, plan, options)
        for name in lied:
            meta = fields["activations_meta"][name]
            meta["dtype"] = "torch.float32"
            meta["size_mb"] = round(meta["numel"] * 4 / 2**20, 2)
        return fields

    t.service._store = store


@fault("float32_through_float16", "dtype_size",
       "float32 captures rounded through float16 before storing (rel. error ~2e-4, inside every value tolerance)")
def _float32_through_float16(t: Target) -> None:
    def change(gen, plan, options):
        gen.tensors = {n: x.to(torch.float16).to(torch.float32) if x.dtype == torch.float32 else x
                       for n, x in gen.tensors.items()}

    _wrap_generate(t, change)


@fault("wrong_size", "dtype_size", "`size_mb` computed with the wrong item size")
def _wrong_size(t: Target) -> None:
    def change(fields, gen, plan, options):
        for meta in fields["activations_meta"].values():
            meta["size_mb"] = round(meta["numel"] * 8 / 2**20, 2)

    _wrap_store(t, change)


@fault("meta_shape_lies", "dtype_size", "metadata claims [1,N,D] while the file holds [1,1,D]")
def _meta_shape_lies(t: Target) -> None:
    original = t.service._store

    def store(gen, plan, options):
        claimed = {n: list(x.shape) for n, x in gen.tensors.items()}
        gen.tensors = {n: x[:, :1].clone() for n, x in gen.tensors.items()}
        fields = original(gen, plan, options)
        for name, meta in fields["activations_meta"].items():
            numel = 1
            for d in claimed[name]:
                numel *= d
            item = torch.empty((), dtype=getattr(torch, meta["dtype"].removeprefix("torch."))).element_size()
            meta.update(shape=claimed[name], numel=numel, size_mb=round(numel * item / 2**20, 2))
        return fields

    t.service._store = store


@fault("missing_file", "dtype_size", "`activations_meta` points to a file that is not there")
def _missing_file(t: Target) -> None:
    from pathlib import Path

    def change(fields, gen, plan, options):
        for meta in fields["activations_meta"].values():
            Path(meta["file_path"]).unlink(missing_ok=True)

    _wrap_store(t, change)


@fault("safetensors_wrong_key", "dtype_size", "safetensors files store the tensor under 'tensor', not the savepoint name")
def _safetensors_key(t: Target) -> None:
    from safetensors.torch import save_file

    from capture_conformance.reference_server import storage

    def save(tensors, path, *args, **kwargs):
        return save_file({"tensor": next(iter(tensors.values()))}, path, *args, **kwargs)

    storage.save_file = save  # process-wide: a faulty server runs one fault only


# -- chat -------------------------------------------------------------------------


@fault("zero_usage", "chat", "`usage` all zeros")
def _zero_usage(t: Target) -> None:
    _wrap_response(t, lambda r, req: r["usage"].update(prompt_tokens=0, completion_tokens=0, total_tokens=0))


@fault("no_chat_template", "chat", "chat template ignored: `role: content` lines joined")
def _no_template(t: Target) -> None:
    def render(model, messages):
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return model.tokenizer(text, add_special_tokens=False)["input_ids"]

    t.service._render_prompt = render


@fault("ids_skip_first", "multi_token", "`completion_token_ids` excludes the first generated token")
def _ids_skip_first(t: Target) -> None:
    def change(fields, gen, plan, options):
        fields["completion_token_ids"] = fields["completion_token_ids"][1:]

    _wrap_store(t, change)


@fault("max_tokens_plus_one", "chat", "generates one token more than `max_tokens`")
def _plus_one(t: Target) -> None:
    original = t.service._generate

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        from dataclasses import replace

        return await original(worker, prompt_ids, replace(params, max_new_tokens=params.max_new_tokens + 1), plan, options, **kw)

    t.service._generate = generate


def _wrap_params(target: Target, change: Callable) -> None:
    """Replace the service's generate seam by one that edits the generation parameters first."""
    original = target.service._generate

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        return await original(worker, prompt_ids, change(params), plan, options, **kw)

    target.service._generate = generate


@fault("always_greedy", "chat", "`temperature` ignored: every request decoded greedily")
def _always_greedy(t: Target) -> None:
    from dataclasses import replace

    _wrap_params(t, lambda params: replace(params, temperature=0.0))


@fault("seed_ignored", "chat", "`seed` ignored: sampled requests draw from the process's shared randomness")
def _seed_ignored(t: Target) -> None:
    from dataclasses import replace

    _wrap_params(t, lambda params: replace(params, seed=None))


@fault("stop_ignored", "chat", "`stop` strings ignored")
def _stop_ignored(t: Target) -> None:
    original = t.service._generate

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        from dataclasses import replace

        return await original(worker, prompt_ids, replace(params, stop=()), plan, options, **kw)

    t.service._generate = generate


# -- concurrency and nnsight ---------------------------------------------------------


@fault("no_lock", "out_of_order", "no serialisation of traces: concurrent requests run at once")
def _no_lock(t: Target) -> None:
    import anyio

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        from capture_conformance.reference_server.types import DTYPES

        return await anyio.to_thread.run_sync(
            worker.model.generate, prompt_ids, params, plan, options.tokens, DTYPES[options.dtype]
        )

    t.service._generate = generate


class _ServerError(CaptureError):
    status_code = 500


@fault("sampling_ooo_500", "out_of_order", "`temperature` > 0 with `top_p` answered 500 naming OutOfOrderError")
def _sampling_ooo(t: Target) -> None:
    original = t.service.chat_completion

    async def chat_completion(req):
        if req.temperature > 0 and req.top_p < 1:
            raise _ServerError("OutOfOrderError: Value was missed for model.layers.0.output.i1")
        return await original(req)

    t.service.chat_completion = chat_completion


# -- bad input, health and loading -------------------------------------------------------


@fault("unknown_selector_500", "bad_input", "unknown selector answered with 500")
def _selector_500(t: Target) -> None:
    original = t.service._plan

    def plan(model, savepoints):
        try:
            return original(model, savepoints)
        except Unprocessable as exc:
            raise _ServerError(f"AttributeError: {exc.detail}") from None

    t.service._plan = plan


@fault("bad_json_500", "bad_input", "malformed JSON answered with 500")
def _bad_json(t: Target) -> None:
    @t.app.middleware("http")
    async def crash_on_bad_json(request: Request, call_next):
        if request.method == "POST":
            body = await request.body()
            try:
                json.loads(body or b"null")
            except ValueError:
                return JSONResponse({"detail": "Internal Server Error"}, status_code=500)
        return await call_next(request)


@fault("health_without_model", "health", "`/health` says ok before any model is loaded")
def _health_early(t: Target) -> None:
    import time

    t.readiness.ready.set()  # ready from the first request, loading or not
    original = t.registry.load

    def slow_load(model_id, device=None, dtype=None):
        time.sleep(3)  # a real model takes seconds to load: the window where the lie shows
        return original(model_id, device, dtype)

    t.registry.load = slow_load


@fault("load_drops_model", "models", "a failed `/models/load` drops the model that was serving")
def _load_drops(t: Target) -> None:
    original = t.registry.load

    def load(model_id, device=None, dtype=None):
        try:
            return original(model_id, device, dtype)
        except CaptureError:
            t.registry._workers.clear()
            raise

    t.registry.load = load


# -- issue 12 -----------------------------------------------------------------------
# (absolute imports: this block moves with the faults to tests/ unchanged)
# Value faults: every shape, dtype and cross-check of the other areas still holds; only a
# comparison with an independent computation of the model (area values) can tell.


def _replace_sites(t: Target, choose: Callable) -> None:
    """Replace the plan seam: ``choose(model, site)`` returns the site actually captured instead."""
    from capture_conformance.reference_server.types import PlannedSavepoint

    original = t.service._plan

    def plan(model, savepoints):
        return [PlannedSavepoint(name=sp.name, selector=sp.selector, site=choose(model, sp.site) or sp.site)
                for sp in original(model, savepoints)]

    t.service._plan = plan


_LAYOUTS: dict[int, object] = {}


def _layout(model):
    """The served model's roles (block stack, head, final norm), by structure: faults work on every family."""
    from capture_conformance.harness.protocol.layout import layout_from_module

    if id(model) not in _LAYOUTS:
        _LAYOUTS[id(model)] = layout_from_module(model._module)  # test code: the torch module under nnsight
    return _LAYOUTS[id(model)]


def _layer_index(model, path: str) -> tuple[str, int, str] | None:
    """``<blocks>.3.mlp`` -> (<blocks>, 3, ".mlp") over the model's own block stack, whatever it is called."""
    layout = _layout(model)
    where = layout.block_of(path)
    return (layout.blocks, where[0], where[1]) if where else None


def _is_logits(t: Target, site) -> bool:
    """Whether ``site`` is the output of the head of a model the target serves (``lm_head``, ``embed_out``...)."""
    return site.io == "output" and site.module_path in {_layout(w.model).head for w in t.registry.workers()}


@fault("layer_from_next", "values", "a decoder block's output (and input) served from block i+1, consistently")
def _layer_from_next(t: Target) -> None:
    # An off-by-one into a list of per-layer hooks or of output_hidden_states.
    def choose(model, site):
        where = _layer_index(model, site.module_path)
        if where and where[2] == "":
            return model.sites.get((f"{where[0]}.{where[1] + 1}", site.io))
        return None

    _replace_sites(t, choose)


@fault("last_layer_after_norm", "values", "the last decoder block's output taken after the final norm")
def _last_layer_after_norm(t: Target) -> None:
    # hidden_states[-1] of output_hidden_states is after the final norm, not the last block's output.
    def choose(model, site):
        where = _layer_index(model, site.module_path)
        layout = _layout(model)
        if where and where[2] == "" and site.io == "output" and where[1] == layout.last and layout.final_norm:
            return model.sites.get((layout.final_norm, "output"))
        return None

    _replace_sites(t, choose)


@fault("logits_as_probabilities", "values", "the head's captures stored as softmax probabilities (same argmax)")
def _logits_as_probabilities(t: Target) -> None:
    def change(gen, plan, options):
        for sp in plan:
            if _is_logits(t, sp.site) and sp.name in gen.tensors:
                x = gen.tensors[sp.name]
                gen.tensors[sp.name] = torch.softmax(x.float(), dim=-1).to(x.dtype)

    _wrap_generate(t, change)


@fault("logits_temperature_scaled", "values", "sampled requests store the logits divided by the temperature")
def _logits_temperature_scaled(t: Target) -> None:
    # Captured after the logits processors (temperature warper) instead of at lm_head.
    original = t.service._generate

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        generation = await original(worker, prompt_ids, params, plan, options, **kw)
        if params.temperature > 0:
            for sp in plan:
                if _is_logits(t, sp.site) and sp.name in generation.tensors:
                    generation.tensors[sp.name] = generation.tensors[sp.name] / params.temperature
        return generation

    t.service._generate = generate


@fault("other_checkpoint", "values", "a slightly different checkpoint of the same architecture served under the name")
def _other_checkpoint(t: Target) -> None:
    # Same config, same shapes, same tokenizer; weights differ by 3% of each tensor's spread
    # (a fine-tune, another revision), deterministic so the run is reproducible.
    original = t.registry.load

    def load(model_id, device=None, dtype=None):
        loaded = original(model_id, device, dtype)
        if loaded:
            module = t.registry.get(model_id).model._module
            generator = torch.Generator().manual_seed(12)
            with torch.no_grad():
                for param in module.parameters():
                    noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
                    param.add_(noise * (0.03 * param.float().std()).to(param.dtype))
        return loaded

    t.registry.load = load


@fault("step0_wrong_position", "values", "step 0 of layer savepoints taken at prompt position P-2, not P-1")
def _step0_wrong_position(t: Target) -> None:
    # The prefill step's [1, P, H] indexed one too early; later steps ([1, 1, H]) are right. The
    # logits are left alone (their argmax would give it away in the greedy checks).
    from dataclasses import replace

    original = t.service._generate

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        generation = await original(worker, prompt_ids, params, plan, options, **kw)
        hidden = [sp for sp in plan if not _is_logits(t, sp.site) and sp.name in generation.tensors]
        holds_step0 = options.tokens in ("all", "first") or len(generation.token_ids) == 1
        if hidden and holds_step0 and len(prompt_ids) > 1:
            # Position P-2 of the prompt is the last position of a pass over the prompt without its last id.
            early = await original(worker, prompt_ids[:-1], replace(params, max_new_tokens=1, stop=()), hidden,
                                   options.model_copy(update={"tokens": "first"}))
            for sp in hidden:
                generation.tensors[sp.name][:, 0] = early.tensors[sp.name][:, 0]
        return generation

    t.service._generate = generate


@fault("mlp_after_inplace_add", "values", "`mlp` output captured by reference, then modified in place by the residual add")
def _mlp_after_inplace_add(t: Target) -> None:
    # What a hook that keeps a view (no clone) sees when the layer adds the residual in place:
    # the decoder layer's output.
    def choose(model, site):
        where = _layer_index(model, site.module_path)
        if where and where[2] == f".{_layout(model).block_mlp}" and site.io == "output":
            return model.sites.get((f"{where[0]}.{where[1]}", "output"))
        return None

    _replace_sites(t, choose)


@fault("capture_changes_generation", "values",
       "requests with several savepoints take a second code path that applies repetition_penalty 1.3")
def _capture_changes_generation(t: Target) -> None:
    # Two generation paths with different generation settings: the answer depends on what was captured.
    from capture_conformance.reference_server.nnsight_core import CaptureModel

    # The worker's seam: every request, solo or batched, reaches the model through generate_batch.
    original = CaptureModel.generate_batch

    def generate_batch(self, requests):
        if not any(len(r.savepoints) > 1 for r in requests):
            return original(self, requests)
        plain = CaptureModel._generate_kwargs
        self._generate_kwargs = lambda p, *a, **k: {**plain(self, p, *a, **k), "repetition_penalty": 1.3}
        try:
            return original(self, requests)
        finally:
            del self._generate_kwargs

    CaptureModel.generate_batch = generate_batch  # process-wide: a faulty server runs one fault only


# -- issue 13 --------------------------------------------------------------------------------
# Prompt and whole-sequence capture (protocol 1.1 ``capture.positions``), caught by the positions area.


def _wrap_positions(target: Target, kind: tuple[str, ...], change: Callable) -> None:
    """Edit each tensor of a request whose positions are in ``kind``: change(tensor, prompt_len) -> tensor."""

    def edit(generation, plan, options):
        if options.positions in kind:
            for name, tensor in list(generation.tensors.items()):
                generation.tensors[name] = change(tensor, generation.prompt_len)

    original = target.service._generate

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        generation = await original(worker, prompt_ids, params, plan, options, **kw)
        generation.prompt_len = len(prompt_ids)
        edit(generation, plan, options)
        return generation

    target.service._generate = generate


@fault("prompt_off_by_one", "positions",
       "prompt positions taken one to the left: position j holds j-1 (the first duplicated), in prompt and sequence")
def _prompt_off_by_one(t: Target) -> None:
    def shift(tensor, p):
        if tensor.shape[1] < p:
            return tensor  # tokens first/last: one position, nothing to shift
        return torch.cat([tensor[:, :1], tensor[:, : p - 1], tensor[:, p:]], dim=1)

    _wrap_positions(t, ("prompt", "sequence"), shift)


@fault("sequence_without_last_token", "positions",
       "`sequence` ends at the last token generation fed: [1, P+N-1, D], the last completion token missing")
def _sequence_short(t: Target) -> None:
    _wrap_positions(t, ("sequence",), lambda tensor, p: tensor[:, :-1].clone() if tensor.shape[1] > 1 else tensor)


@fault("prompt_capture_without_template", "positions",
       "prompt positions captured in a second pass over the raw message text, without the chat template")
def _prompt_without_template(t: Target) -> None:
    import contextvars
    from dataclasses import replace

    from capture_conformance.reference_server import chat

    raw_text = contextvars.ContextVar("raw_text", default=None)
    prepare = t.service.prepare_chat

    def prepare_chat(req):
        raw_text.set("\n".join(m.content for m in req.messages))  # seen by _generate: same task, same context
        return prepare(req)

    original = t.service._generate

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        generation = await original(worker, prompt_ids, params, plan, options, **kw)
        positions = options.positions
        if positions == "generated" or raw_text.get() is None:
            return generation
        raw_ids = chat.encode_raw(worker.model.tokenizer, raw_text.get())
        raw = await original(worker, raw_ids, replace(params, max_new_tokens=1), plan, options.model_copy(update={"positions": "prompt"}))
        p = len(prompt_ids)
        for name, tensor in generation.tensors.items():
            head = raw.tensors[name] if tensor.shape[1] > 1 else tensor
            generation.tensors[name] = head if positions == "prompt" else torch.cat([head, tensor[:, p:]], dim=1)
        return generation

    t.service.prepare_chat = prepare_chat
    t.service._generate = generate


# -- issue 14 --


@fault("list_content_first_part", "chat", "content given as a list of text parts is rendered from its first part only")
def _list_content_first_part(t: Target) -> None:
    # The shortcut of servers that grew list support late: `content[0]["text"]`.
    original = t.service._render_prompt

    def render_prompt(model, messages):
        flattened = [{**m, "content": m["content"][0]["text"]} if isinstance(m["content"], list) else m
                     for m in messages]
        return original(model, flattened)

    t.service._render_prompt = render_prompt


@fault("developer_as_is", "chat", "the `developer` role is handed as is to a chat template that does not know it")
def _developer_as_is(t: Target) -> None:
    # What a server does that passes messages straight to the template: Qwen-style
    # templates then drop the message or render a role the model never saw.
    def render_prompt(model, messages):
        tokenizer = model.tokenizer
        flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                 else "\n".join(part["text"] for part in m["content"])} for m in messages]
        rendered = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]

    t.service._render_prompt = render_prompt


@fault("non_text_part_500", "chat", "a non-text content part (image, audio) answered with 500")
def _non_text_part_500(t: Target) -> None:
    # `part["text"]` on an image part: a KeyError that reaches the client as a 500.
    @t.app.middleware("http")
    async def crash_on_non_text_part(request: Request, call_next):
        if request.method == "POST" and request.url.path == "/v1/chat/completions":
            try:
                messages = json.loads(await request.body() or b"null").get("messages") or []
                parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]]
            except (ValueError, AttributeError, TypeError):
                parts = []
            if any(isinstance(p, dict) and p.get("type") != "text" for p in parts):
                return JSONResponse({"detail": "Internal Server Error"}, status_code=500)
        return await call_next(request)


# -- issue 15 --


@fault("validation_echo_500", "bad_input",
       "the stock validation handler echoes NaN, 1e400 or a lone surrogate back and answers 500")
def _validation_echo(t: Target) -> None:
    from fastapi.exception_handlers import request_validation_exception_handler
    from fastapi.exceptions import RequestValidationError

    # FastAPI's own handler: its 422 carries the input, which strict JSON cannot encode.
    t.app.add_exception_handler(RequestValidationError, request_validation_exception_handler)


# -- issue 11 --


@fault("four_d_logits", "multi_token", "every capture stored [1, N, 1, D]: per-step [1,1,D] tensors stacked unsqueezed")
def _four_d(t: Target) -> None:
    def change(gen, plan, options):
        gen.tensors = {n: x.unsqueeze(2) for n, x in gen.tensors.items()}

    _wrap_generate(t, change)


@fault("no_load_route", "models", "no `POST /models/load` route: the framework's 404 'Not Found' for it")
def _no_load_route(t: Target) -> None:
    # On the wire exactly what a server without the route answers (Starlette's 404 for an unknown path);
    # a middleware, not surgery on the app's routes, whose layout is the framework's business.
    @t.app.middleware("http")
    async def no_such_route(request: Request, call_next):
        if request.url.path == "/models/load":
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return await call_next(request)


# -- issue 19 --


@fault("streamed_last_step_repeated", "streaming",
       "streamed runs store the last step's values at every step (ids, shapes and the unstreamed runs right)")
def _streamed_last_step_repeated(t: Target) -> None:
    original = t.service._generate

    async def generate(worker, prompt_ids, params, plan, options, on_token=None, **kw):
        generation = await original(worker, prompt_ids, params, plan, options, on_token=on_token, **kw)
        if on_token is not None:  # only a streamed request passes a token callback
            generation.tensors = {n: x[:, -1:].expand_as(x).clone() for n, x in generation.tensors.items()}
        return generation

    t.service._generate = generate


@fault("batch_prompt_padding_kept", "out_of_order",
       "prompt-position captures of a request batched with a longer prompt keep the left padding "
       "(zeros first, the prompt shifted right and its end cut)")
def _batch_prompt_padding_kept(t: Target) -> None:
    # What a batching server that forgets to strip the left padding of prompt rows stores: the request's
    # P positions are read from the padded batch's first P columns. Seen by overlapping generations.
    original = t.service._generate
    in_flight: list[dict] = []

    async def generate(worker, prompt_ids, params, plan, options, **kw):
        mine = {"prompt": len(prompt_ids), "longest": len(prompt_ids)}
        for other in in_flight:
            other["longest"] = max(other["longest"], mine["prompt"])
            mine["longest"] = max(mine["longest"], other["prompt"])
        in_flight.append(mine)
        try:
            generation = await original(worker, prompt_ids, params, plan, options, **kw)
        finally:
            in_flight.remove(mine)
        pad, prompt = mine["longest"] - mine["prompt"], mine["prompt"]
        if pad and options.positions != "generated" and options.tokens == "all":
            def padded(x):
                y = x.clone()
                y[:, :prompt] = 0
                if pad < prompt:
                    y[:, pad:prompt] = x[:, :prompt - pad]
                return y

            generation.tensors = {n: padded(x) for n, x in generation.tensors.items()}
        return generation

    t.service._generate = generate
