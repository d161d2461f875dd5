"""Loaded models, each with the one worker thread that runs its traces.

nnsight 0.8 cannot run two traces on one model at once, so every call that
touches a model goes through that model's single worker thread: traces are
serialised per model by construction (concurrent requests are batched into one
trace instead, see ModelWorker), and the event loop only awaits a future,
so ``/health`` and other requests are answered while a generation runs. A
client that disconnects cancels its call: a queued job is dropped, a running
generation stops at its next step (no lock is ever left held either way).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from capture_conformance.fixtures.tiny_model import resolve_model_path

from .errors import Conflict, Forbidden, NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelWorker:
    """The one thread that runs a model's traces, batching compatible generations.

    Jobs queue in arrival order. When the thread takes a generation job, it also
    takes up to ``max_batch - 1`` queued jobs with the same batch key (greedy, no
    stop strings) and serves them all with one generate: requests that arrive
    while a generation runs share the next one.
    """

    def __init__(self, model, max_batch: int = 1, max_batch_tokens: int = 8192):
        self.model = model
        self.max_batch = max(1, max_batch)
        # Rows are left-padded to the longest prompt and run to the longest max_tokens,
        # so a batch costs rows x that width: one long prompt among short ones multiplies
        # its memory by the row count. A request over the budget alone still runs alone.
        self.max_batch_tokens = max_batch_tokens
        self._jobs: deque[_Job] = deque()
        self._wakeup = threading.Condition()
        self._stopped = False
        self._draining = False  # set by drain(): the queue is served, then the thread ends
        self.batches_run: list[int] = []  # sizes of the batches served, newest last (bounded)
        self._thread = threading.Thread(target=self._serve, name=f"model-{model.model_id}", daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run ``fn`` alone on the model's thread."""
        return await self._submit(_Job(key=None, call=lambda: fn(*args, **kwargs)))

    async def generate(self, request, reservation=None):
        """Run one generation, possibly batched with others (see GenerationRequest.batch_key).

        ``reservation`` (admission.Reservation): what the request was charged; a batch of
        requests with whole-prompt logits is formed only within it (see _fits_logits).
        """
        return await self._submit(_Job(key=request.batch_key(), request=request, reservation=reservation))

    async def _submit(self, job: "_Job"):
        with self._wakeup:
            if self._stopped or self._draining:
                raise NotFound(f"model {self.model.model_id!r} is being unloaded")
            self._jobs.append(job)
            self._wakeup.notify()
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            # The caller is gone (a client that hung up): a queued job is dropped by the
            # cancelled future; a running generation stops at its next step.
            if job.request is not None:
                job.request.cancelled.set()
            raise

    def _take_batch(self) -> list["_Job"]:
        with self._wakeup:
            while not self._jobs and not self._stopped and not self._draining:
                self._wakeup.wait()
            if self._stopped or not self._jobs:  # stopped, or drained to the end
                return []
            first = self._jobs.popleft()
            batch = [first]
            if first.key is not None:
                for job in list(self._jobs):
                    if len(batch) >= self.max_batch:
                        break
                    if (job.key == first.key and padded_tokens([*batch, job]) <= self.max_batch_tokens
                            and _fits_logits(batch, job)):
                        self._jobs.remove(job)
                        batch.append(job)
            return batch

    def _serve(self) -> None:
        while batch := self._take_batch():
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batches_run = (self.batches_run + [len(live)])[-1000:]
            try:
                if live[0].request is None:
                    results = [live[0].call()]
                else:
                    results = self.model.generate_batch([job.request for job in live])
            except BaseException as exc:  # every waiting request gets the error; the thread lives on
                for job in live:
                    job.future.set_exception(exc)
                continue
            for job, result in zip(live, results):
                job.future.set_result(result)

    def shutdown(self) -> None:
        with self._wakeup:
            self._stopped = True
            for job in self._jobs:
                job.future.cancel()
            self._jobs.clear()
            self._wakeup.notify_all()

    def drain(self) -> None:
        """Refuse new jobs, serve those queued, then end the thread (an unload: nobody's request is cut)."""
        with self._wakeup:
            self._draining = True
            self._wakeup.notify_all()


def padded_tokens(jobs: list["_Job"]) -> int:
    """What one generate over these jobs holds: rows x (longest prompt + longest max_tokens)."""
    width = max(len(j.request.prompt_ids) for j in jobs) + max(j.request.params.max_new_tokens for j in jobs)
    return len(jobs) * width


def _fits_logits(batch: list["_Job"], job: "_Job") -> bool:
    """Whether ``job`` may join ``batch`` as far as whole-prompt logits go.

    Their forward holds rows x longest prompt x V float32 logits; each row was charged
    its own prompt's (Reservation.logits_bytes). The padding beyond that is taken from
    the budget now, on the joining job's reservation, or the job waits to run alone
    or in a later batch. Requests without such logits always fit.
    """
    rows = [*batch, job]
    if not all(j.reservation is not None and j.reservation.logits_bytes > 0 for j in rows):
        return not any(j.reservation is not None and j.reservation.logits_bytes > 0 for j in rows)
    per_position = job.reservation.logits_bytes / max(1, len(job.request.prompt_ids))
    longest = max(len(j.request.prompt_ids) for j in rows)
    padded = int(len(rows) * longest * per_position)
    charged = sum(j.reservation.logits_bytes + j.logits_extra for j in rows)
    if padded <= charged:
        return True
    if job.reservation.try_extend(padded - charged):
        job.logits_extra = padded - charged
        return True
    return False


@dataclass(eq=False)
class _Job:
    key: object
    request: object = None
    call: Callable | None = None
    future: Future = field(default_factory=Future)
    reservation: object = None  # admission.Reservation, for the batching of whole-prompt logits
    logits_extra: int = 0  # padding logits added to the reservation when it joined a batch


class LoadPolicy:
    """Which models ``POST /models/load`` may open (issue 20: loading by request was an open door).

    Allowed: the startup model; the built-in tiny models (``tiny-qwen3`` and the zoo's
    ids: built locally from code on first use, they never read an operator's files
    nor reach the network); every id or directory the operator listed with
    ``--allow-load`` (a listed directory allows itself and every directory below it,
    compared after symlinks, ``..`` and ``//`` are resolved, so no spelling escapes it);
    anything with ``--allow-any-load``. A refused path answers the same 403 whether it
    exists or not (only a path below a listed directory is looked at).
    """

    def __init__(self, allowed: tuple[str, ...] = (), *, allow_any: bool = False, startup: str | None = None):
        from capture_conformance.fixtures.zoo import BUILTIN_IDS

        self.allow_any = allow_any
        self.ids = {*allowed, *BUILTIN_IDS, *([startup] if startup else [])}
        # The operator's listed directories (read at start: the operator's own files).
        self.roots = [os.path.realpath(entry) for entry in allowed if _local_dir(entry) is not None]

    def describe(self) -> str:
        """What the policy opens, for the start-up log."""
        if self.allow_any:
            return ("--allow-any-load: POST /models/load opens ANY local directory this process can read and any "
                    "hub id (network unless HF_HUB_OFFLINE=1)")
        from capture_conformance.fixtures.zoo import BUILTIN_IDS

        listed = sorted(self.ids - set(BUILTIN_IDS))
        return (f"POST /models/load opens the built-in tiny models and {listed or 'nothing else'} "
                "(--allow-load, --allow-any-load to open anything)")

    def check(self, model_id: str) -> None:
        if self.allow_any or model_id in self.ids:
            return
        if self.roots:
            resolved = _local_dir(model_id)  # None unless an existing directory: no hub id passes as a path
            if resolved is not None and any(resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep)
                                            for root in self.roots):
                return
        raise Forbidden(f"loading {model_id!r} is not allowed: this server loads by request only its startup model, "
                        "the built-in tiny models and the ids or directories (with what is below them) its operator "
                        "listed with --allow-load, or anything with --allow-any-load")


class ModelRegistry:
    """Model id -> worker. Loading is serialised; a failed load changes nothing.

    ``policy`` (a LoadPolicy) decides what ``load`` may open; None opens anything (a
    registry made by a test or a tool; the app gives the server's policy). Pinned models
    (the startup model) cannot be unloaded.
    """

    def __init__(self, device: str = "auto", dtype: str = "auto", loader: Callable | None = None,
                 max_batch: int | None = None, max_batch_tokens: int = 8192, max_loaded: int = 4,
                 policy: LoadPolicy | None = None):
        self.policy = policy
        self._pinned: set[str] = set()
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_loaded = max_loaded
        self._loader = loader
        self._workers: dict[str, ModelWorker] = {}
        # Resolved directory -> the id it was loaded under: D, D/, D/. and D// are one model.
        self._by_path: dict[str, str] = {}
        self._load_lock = threading.Lock()

    def _load(self, model_id: str, device: str, dtype: str):
        if self._loader is not None:
            return self._loader(model_id, device, dtype)
        from .nnsight_core import CaptureModel  # heavy import, only where a model is loaded

        return CaptureModel.load(model_id, resolve_model_path(model_id), device=device, dtype=dtype)

    def load(self, model_id: str, device: str | None = None, dtype: str | None = None) -> bool:
        """Load ``model_id`` unless it is loaded already (under any spelling); True if this call loaded it."""
        with self._load_lock:
            path = _local_dir(resolve_model_path(model_id))
            if self.loaded_id(model_id) is not None or (path is not None and path in self._by_path):
                return False
            if self.policy is not None:
                self.policy.check(model_id)  # after the no-op: any spelling of a loaded model stays a 200
            if len(self._workers) >= self.max_loaded:
                raise Conflict(f"{len(self._workers)} models are loaded, the limit (--max-loaded-models); "
                               f"{model_id!r} was not loaded")
            try:
                model = self._load(model_id, device or self.device, dtype or self.dtype)
            except Exception as exc:  # no such directory, no hub, a broken checkpoint: the server lives on
                # One answer for every cause: the reason (which files exist, which do not)
                # is the host's business and goes to the log only.
                log.warning("loading %r failed: %s", model_id, _first_line(exc), exc_info=not isinstance(exc, OSError))
                raise NotFound(f"model {model_id!r} could not be loaded (the server log has the reason)") from None
            self._workers[model_id] = ModelWorker(model, max_batch=batch_size_for(model, self.max_batch),
                                                 max_batch_tokens=self.max_batch_tokens)
            if path is not None:
                self._by_path[path] = model_id
            return True

    def pin(self, model_id: str) -> None:
        """Keep ``model_id`` loaded for good (the startup model): unload refuses it."""
        loaded = self.loaded_id(model_id)
        if loaded is not None:
            self._pinned.add(loaded)

    def unload(self, model_id: str) -> str:
        """Unload a model loaded by request: new requests for it are 404 at once, queued ones are served first."""
        with self._load_lock:
            loaded = self.loaded_id(model_id)
            if loaded is None:
                raise NotFound(f"model {model_id!r} is not loaded (loaded: {sorted(self._workers)})")
            if loaded in self._pinned:
                raise Conflict(f"model {loaded!r} is the startup model (--model): it cannot be unloaded")
            worker = self._workers.pop(loaded)
            for path in [p for p, i in self._by_path.items() if i == loaded]:
                del self._by_path[path]
        worker.drain()  # its thread ends after the queued jobs; the model is freed with the last reference
        return loaded

    def loaded_id(self, model_id: str) -> str | None:
        """The id ``model_id`` is loaded under (itself, or a directory's first spelling); None if not loaded."""
        if model_id in self._workers:
            return model_id
        path = _local_dir(model_id)
        return self._by_path.get(path) if path is not None else None

    def get(self, model_id: str | None) -> ModelWorker:
        if model_id is None:
            if not self._workers:
                raise NotFound("no model is loaded")
            return next(iter(self._workers.values()))
        loaded = self.loaded_id(model_id)
        if loaded is None:
            raise NotFound(f"model {model_id!r} is not loaded (loaded: {sorted(self._workers)})")
        return self._workers[loaded]

    def ids(self) -> list[str]:
        return list(self._workers)

    def workers(self) -> list[ModelWorker]:
        return list(self._workers.values())

    def layout(self) -> dict:
        """How the models are spread over devices (protocol 1.2 ``layout``): one process here, no sharding.
        A tensor-parallel server's registry (distributed.TensorParallelRegistry) reports its ranks."""
        devices = sorted({str(getattr(getattr(w.model, "info", None), "device", self.device)) for w in self.workers()})
        return {"tp_size": 1, "backend": "none", "devices": devices, "disabled": {}}

    def shutdown(self) -> None:
        for worker in self._workers.values():
            worker.shutdown()


AUTO_MAX_BATCH = 8


def batch_size_for(model, requested: int | None) -> int:
    """``None`` (auto): batch float32 models only.

    A batched bfloat16/float16 forward rounds differently from a solo one (other
    kernels, padding): on an H100 with a Qwen3-0.6B-shaped model, batched greedy
    ids left their solo runs within a few tokens and logits moved by 0.125. That
    breaks the protocol's "same result alone or among concurrent requests", so
    half-precision models batch only when the operator asks (--max-batch N).
    """
    if requested is not None:
        return requested
    return AUTO_MAX_BATCH if model.info.dtype == "float32" else 1


def _local_dir(path: str) -> str | None:
    """The resolved path of a local directory (symlinks, '.', '//' and a trailing '/' gone), else None."""
    try:
        return os.path.realpath(path) if os.path.isdir(path) else None
    except (OSError, ValueError):  # a NUL byte, a name too long
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
