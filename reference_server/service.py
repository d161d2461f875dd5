"""What each capture endpoint does, between the web layer and the three seams.

Validates a request against the loaded model (selectors, limits), renders the
prompt (chat), runs the generation on the model's worker (nnsight core) and
stores the tensors (storage). Returns plain dicts; knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from . import chat
from .admission import LOGIT_ITEMSIZE, NO_RESERVATION, CaptureBudget, Reservation
from .errors import BadRequest, CaptureError, Unprocessable
from .input_rules import GREEDY_TEMPERATURE_EPS, MAX_STOP_CHARS, MAX_STOP_STRINGS
from .registry import ModelRegistry, ModelWorker
from .schemas import CaptureOptions, ChatRequest, PureRequest
from .selectors import LOGITS, parse_selector
from .settings import Settings
from .storage import RunStore
from .types import DTYPES, GenerationParams, GenerationRequest, PlannedSavepoint

log = logging.getLogger(__name__)
# ``logits``: the served model's output head, whatever its module path (see selectors).
DEFAULT_SAVEPOINTS = [{"name": "_logits", "selector": LOGITS}]
# Optional protocol features this server supports (/v1/models capture.features, protocol 1.1).
FEATURES = ["prompt", "sequence", "streaming", "safetensors", "bfloat16", "float16"]


def _positions_note(positions: str, prompt_len: int, max_tokens: int, tokens: str) -> str:
    if tokens != "all" or positions == "generated":
        return ""
    counted = f"P={prompt_len}" if positions == "prompt" else f"P+N={prompt_len}+{max_tokens}"
    return f" for {counted} positions ({positions})"


@dataclass(frozen=True)
class PreparedChat:
    """A validated chat request, ready to generate."""

    req: ChatRequest
    worker: ModelWorker
    prompt_ids: list[int]
    params: GenerationParams
    plan: list[PlannedSavepoint]
    options: CaptureOptions
    wants_capture: bool
    reservation: Reservation = NO_RESERVATION  # its share of the capture budget, held until the files are written


class CaptureService:
    def __init__(self, settings: Settings, registry: ModelRegistry, store: RunStore,
                 budget: CaptureBudget | None = None, *, activation_url: Callable[[str, str], str]):
        self.settings = settings
        self.registry = registry
        self.store = store
        self.activation_url = activation_url  # (run_id, savepoint name) -> the download path; the app passes its route
        self.budget = budget or CaptureBudget(int((settings.capture_budget_mb or 4096.0) * 2**20))
        # Files are written by one writer thread: the event loop stays free, and the
        # next request's generation (on the model's worker) overlaps this request's I/O.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage-writer")

    # -- validation -------------------------------------------------------------

    def _max_tokens(self, requested: int | None) -> int:
        limit = self.settings.max_new_tokens_limit
        value = requested if requested is not None else min(self.settings.default_max_tokens, limit)
        if value > limit:
            raise Unprocessable(f"max_tokens {value} is over this server's limit of {limit} (--max-new-tokens-limit)")
        return value

    def _plan(self, model, savepoints) -> list:
        specs = savepoints if savepoints is not None else DEFAULT_SAVEPOINTS
        if len(specs) > self.settings.max_savepoints:
            raise Unprocessable(
                f"{len(specs)} savepoints is over the limit of {self.settings.max_savepoints} (--max-savepoints)"
            )
        planned, names, selectors = [], set(), set()
        for spec in specs:
            if isinstance(spec, str):
                name, text = spec, spec
            else:
                name, text = (spec["name"], spec["selector"]) if isinstance(spec, dict) else (spec.name, spec.selector)
            if name in names:
                raise Unprocessable(f"duplicate savepoint name {name!r}")
            if text in selectors:
                raise Unprocessable(f"duplicate selector {text!r}")
            names.add(name)
            selectors.add(text)
            selector = parse_selector(text, model.aliases)
            planned.append(PlannedSavepoint(name=name, selector=selector, site=model.site(selector)))
        return planned

    # -- endpoints --------------------------------------------------------------

    def prepare_chat(self, req: ChatRequest) -> "PreparedChat":
        """Everything that can be refused is refused here, before any generation or response starts."""
        if req.n != 1:
            raise BadRequest(f"n={req.n} is not supported: this server returns exactly one choice (n=1)")
        worker = self.registry.get(req.model)
        model = worker.model
        max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens)
        stop = tuple([req.stop] if isinstance(req.stop, str) else (req.stop or []))
        if any(not s for s in stop) or len(stop) > MAX_STOP_STRINGS:
            raise Unprocessable(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings (got {len(stop)}"
                                f"{', one empty' if any(not s for s in stop) else ''})")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            longest = max(len(s) for s in stop)
            raise Unprocessable(f"a stop string of {longest} characters is over the limit of {MAX_STOP_CHARS} "
                                "characters per stop string")
        capture = req.capture
        wants_capture = req.store_activations or capture is not None
        options = capture if capture is not None else CaptureOptions()  # store_activations alone: the defaults
        plan = self._plan(model, options.savepoints) if wants_capture else []
        prompt_ids = self._render_prompt(model, [m.model_dump() for m in req.messages])
        self._check_context(model, len(prompt_ids), max_tokens)
        # After rendering: prompt and sequence captures grow with the prompt's length.
        capture_bytes = self._check_capture_size(plan, max_tokens, options, len(prompt_ids))

        params = GenerationParams(
            max_new_tokens=max_tokens,
            # A temperature this small is greedy: dividing logits by it overflows to inf/NaN.
            temperature=req.temperature if req.temperature >= GREEDY_TEMPERATURE_EPS else 0.0,
            top_p=req.top_p,
            seed=req.seed,
            stop=stop,
        )
        # Admission last: a request refused for any other reason never holds budget.
        held, logits = self._working_bytes(model, plan, max_tokens, options, len(prompt_ids))
        reservation = self.budget.reserve(capture_bytes, held, logits)
        return PreparedChat(req, worker, prompt_ids, params, plan, options, wants_capture, reservation)

    async def chat_completion(self, req: ChatRequest) -> dict:
        prepared = self.prepare_chat(req)
        with prepared.reservation:  # released once the capture's files are written, or on failure
            return await self._chat_completion(prepared)

    async def _chat_completion(self, prepared: "PreparedChat") -> dict:
        req = prepared.req
        generation = await self._generate(prepared.worker, prepared.prompt_ids, prepared.params, prepared.plan,
                                          prepared.options, reservation=prepared.reservation)
        completion = self._complete(prepared, generation)
        response = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": completion.usage,
        }
        if prepared.wants_capture:
            response.update(await self._store_async(generation, prepared))
        return response

    async def chat_completion_stream(self, prepared: "PreparedChat") -> AsyncIterator[dict]:
        """Chunks of a streamed completion: one per generated token, then the final one(s).

        Token ids come from the worker thread as they are generated; the text delta of
        each is what became printable (held back where a stop string might start).
        """
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int] = asyncio.Queue()
        on_token = lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token)  # noqa: E731
        task = asyncio.ensure_future(self._generate(
            prepared.worker, prepared.prompt_ids, prepared.params, prepared.plan, prepared.options, on_token=on_token))
        prepared.reservation.hold(task)  # a hang-up ends the stream, not the generation: keep its budget
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": prepared.req.model}

        def chunk(delta: dict, finish_reason=None, **extra) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}

        try:
            yield chunk({"role": "assistant", "content": ""})
            tokenizer = prepared.worker.model.tokenizer
            deltas = chat.TextDeltas(tokenizer, prepared.params.stop)
            ids: list[int] = []
            while True:
                getter = asyncio.ensure_future(tokens.get())
                try:
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                if not getter.done() or getter.cancelled():
                    if tokens.empty():
                        break
                    token = tokens.get_nowait()
                else:
                    token = getter.result()
                ids.append(token)
                yield chunk({"content": deltas.push(ids)})
        finally:
            # Cancelled (the client hung up) or closed early: stop the generation too.
            if not task.done():
                task.cancel()
        generation = await task  # raises here if the generation failed
        completion = self._complete(prepared, generation)
        capture = await self._store_async(generation, prepared) if prepared.wants_capture else {}
        include_usage = bool(prepared.req.stream_options and prepared.req.stream_options.include_usage)
        last = chunk({"content": deltas.finish(completion.text)}, completion.finish_reason,
                     **({} if include_usage else capture))
        yield last
        if include_usage:
            yield {**base, "choices": [], "usage": completion.usage, **capture}

    def _complete(self, prepared: "PreparedChat", generation) -> "chat.Completion":
        return chat.complete(prepared.worker.model.tokenizer, prepared.prompt_ids, generation.token_ids,
                             generation.hit_eos, prepared.params.stop)

    async def _store_async(self, generation, prepared: "PreparedChat") -> dict:
        write = self._writer.submit(self._store, generation, prepared.plan, prepared.options)
        prepared.reservation.hold(write)  # the files waiting for the writer count until written
        try:
            fields = await asyncio.wrap_future(write)
        except asyncio.CancelledError:
            # The client is gone: a write not yet started is dropped with the future; one
            # already running is deleted when it ends, so nobody's run is left behind.
            write.add_done_callback(self._discard_run)
            raise
        # The ids the model was fed (protocol 1.1): a client can recompute the values from them.
        return {**fields, "prompt_token_ids": prepared.prompt_ids}

    def _discard_run(self, future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        run_id = future.result().get("activation_run_id")
        if run_id:
            try:
                self.store.delete_run(run_id)
            except CaptureError as exc:  # evicted meanwhile, or a read-only store: nothing more to do
                log.warning("could not discard run %s of a client that left: %s", run_id, exc.detail)

    def _check_capture_size(self, plan, max_tokens: int, options: CaptureOptions, prompt_len: int = 0) -> int:
        """Refuse, before generating, a request whose capture could exceed --max-capture-mb; its worst-case bytes.

        Counts every position kept: N for generated, P for prompt, P+N for sequence.
        """
        positions = options.positions
        kept = {"generated": max_tokens, "prompt": prompt_len, "sequence": prompt_len + max_tokens}[positions]
        steps = kept if options.tokens == "all" else 1
        itemsize = DTYPES[options.dtype].itemsize
        # What is written: `tokens` "first"/"last" keep one position. What the generate holds
        # on the way (every step, the whole prompt's logits) is the budget's (_working_bytes).
        total = sum(steps * math.prod(sp.site.feature_shape) * itemsize for sp in plan)
        limit = self.settings.max_capture_mb
        if total > limit * 2**20:
            raise Unprocessable(
                f"this capture could write {total / 2**20:.1f} MiB, over the limit of {limit:g} MiB "
                f"(--max-capture-mb){_positions_note(positions, prompt_len, max_tokens, options.tokens)}; "
                "ask for fewer tokens, savepoints or a smaller dtype"
            )
        return total

    @staticmethod
    def _working_bytes(model, plan, max_tokens: int, options: CaptureOptions, prompt_len: int) -> tuple[int, int]:
        """What a generate holds beyond the files: (steps held, whole-prompt logits), see admission.

        Steps: with `tokens` "first"/"last" every step of every savepoint is still captured
        (a batch cuts them after it ends), the prompt's positions whole. Logits: the output
        head at prompt positions makes the forward compute every prompt position's logits
        (logits_to_keep=0), float32.
        """
        if not plan:
            return 0, 0
        whole_prompt = options.positions != "generated" and options.tokens != "last"
        itemsize = DTYPES[options.dtype].itemsize

        def kept(site) -> int:
            # Without logits_to_keep=0 the head sees the prompt's last position only.
            prompt = prompt_len if whole_prompt or not site.last_only else 1
            return {"generated": max_tokens, "prompt": prompt, "sequence": prompt + max_tokens}[options.positions]

        held = 0 if options.tokens == "all" else sum(kept(sp.site) * math.prod(sp.site.feature_shape) * itemsize
                                                     for sp in plan)
        vocab = model.info.vocab_size
        logits = prompt_len * vocab * LOGIT_ITEMSIZE if whole_prompt and any(sp.site.last_only for sp in plan) else 0
        return held, logits

    def _check_context(self, model, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request whose prompt plus max_tokens does not fit the model's context."""
        context = getattr(model, "context_length", None)
        if context is not None and prompt_tokens + max_tokens > context:
            raise BadRequest(
                f"this model's context length is {context} tokens, and this request asks for "
                f"{prompt_tokens + max_tokens}: {prompt_tokens} prompt tokens + max_tokens {max_tokens}; "
                "shorten the prompt or lower max_tokens"
            )

    # -- steps of a request, one responsibility each ----------------------------

    def _render_prompt(self, model, messages: list[dict]) -> list[int]:
        return chat.render_prompt(model.tokenizer, messages)

    async def _generate(self, worker, prompt_ids, params, plan, options, on_token=None, reservation=None):
        return await worker.generate(
            GenerationRequest(prompt_ids, params, plan, options.tokens, DTYPES[options.dtype], on_token,
                              options.positions),
            reservation,  # the worker batches whole-prompt logits only within what was charged
        )

    def _store(self, generation, plan, options) -> dict:
        run_id, stored = self.store.write_run(
            generation.tensors,
            options.format,
            extra={"completion_token_ids": generation.token_ids},
        )
        by_name = {sp.name: sp for sp in plan}
        meta = {
            name: {
                "shape": f.shape,
                "dtype": f.dtype,
                "numel": f.numel,
                "size_mb": f.size_mb,
                "file_path": str(f.path),
                "url": self.activation_url(run_id, name),
                "selector": by_name[name].selector.text,
                "tokens": options.tokens,
                "format": options.format,
                "positions": options.positions,
            }
            for name, f in stored.items()
        }
        return {
            "activation_run_id": run_id,
            "completion_token_ids": generation.token_ids,
            "activations_meta": meta,
        }

    async def pure_nnsight(self, req: PureRequest) -> dict:
        worker = self.registry.get(req.model)
        model = worker.model
        max_new = self._max_tokens(req.max_new_tokens)
        prompt_ids = chat.encode_raw(model.tokenizer, req.prompt)
        if not prompt_ids:  # a model cannot generate from nothing: no position to attend from
            raise Unprocessable(f"prompt {req.prompt!r} encodes to no tokens; give at least one")
        self._check_context(model, len(prompt_ids), max_new)
        plan = self._plan(model, DEFAULT_SAVEPOINTS)
        # Its logits capture counts against --max-capture-mb and the capture budget like any other capture.
        capture_bytes = self._check_capture_size(plan, max_new, CaptureOptions(dtype=model.info.dtype))
        with self.budget.reserve(capture_bytes):  # its logits are held on the host like any capture
            generation = await worker.generate(
                GenerationRequest(prompt_ids, GenerationParams(max_new_tokens=max_new), plan, "all", model.dtype)
            )
        logits = generation.tensors["_logits"]
        return {
            "success": True,
            "logits_shape": list(logits.shape),
            "logits_dtype": str(logits.dtype),
            "generated_text": model.tokenizer.decode(generation.token_ids, skip_special_tokens=True),
        }

    def models_list(self) -> dict:
        data = []
        for worker in self.registry.workers():
            model = worker.model
            info = model.info
            data.append(
                {
                    "id": model.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "capture-server",
                    "layout": self.registry.layout(),  # protocol 1.2: tp_size, backend, devices
                    "capture": {
                        "vocab_size": info.vocab_size,
                        "hidden_size": info.hidden_size,
                        "num_layers": info.num_layers,
                        "dtype": info.dtype,
                        "savepoints": model.savepoint_catalogue(),
                        "features": FEATURES,
                    },
                }
            )
        return {"object": "list", "data": data}
