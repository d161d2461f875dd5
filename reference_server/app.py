"""The FastAPI app, built by a factory from the state it is given.

``create_app(settings)`` makes its own registry and store; tests pass their
own. No module-level mutable state: two apps in one process do not share
anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admission import CaptureBudget, default_budget_bytes
from .errors import CaptureError, NotReady, error_body
from .guards import ApiKeyGuard, BodySizeLimit
from .input_rules import json_safe, validation_detail
from .registry import ModelRegistry
from .schemas import ChatRequest, LoadRequest, PureRequest
from .service import CaptureService
from .settings import Settings
from .storage import RunStore

log = logging.getLogger(__name__)
PROTOCOL_VERSION = "1.1"


class Readiness:
    """Whether the startup model is usable; set once by the loading thread."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.failure: str | None = None


def _stream_error(status: int, detail: str) -> dict:
    """An error event after a stream started: OpenAI's envelope, with the protocol's status as ``code``."""
    return {"error": {**error_body(status, detail)["error"], "code": status}}


def _read_chunks(handle, chunk: int = 1 << 20):
    with handle:
        while data := handle.read(chunk):
            yield data


async def _disconnected(request: Request) -> None:
    # The body is read already: what receive() gives now is the client hanging up.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work):
    """Await ``work``; if the client hangs up first, cancel it (its generation stops, nothing is stored)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its error has no reader
            log.info("client left %s before its answer: generation cancelled, nothing stored", request.url.path)
    if not task.done() or task.cancelled():
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    return task.result()


def create_app(
    settings: Settings,
    registry: ModelRegistry | None = None,
    store: RunStore | None = None,
    on_startup_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    owns_registry = registry is None  # shut down only what this app made
    registry = registry or ModelRegistry(device=settings.device, dtype=settings.dtype, max_batch=settings.max_batch,
                                         max_batch_tokens=settings.max_batch_tokens,
                                         max_loaded=settings.max_loaded_models)
    store = store or RunStore(
        settings.storage_dir,
        max_bytes=None if settings.max_storage_mb is None else int(settings.max_storage_mb * 2**20),
        policy=settings.storage_policy,
    )
    if settings.capture_budget_mb is not None:
        budget = CaptureBudget(int(settings.capture_budget_mb * 2**20))
        log.info("capture budget: %.0f MiB of captures in flight (--capture-budget-mb)", budget.limit_bytes / 2**20)
    else:
        budget = CaptureBudget(default_budget_bytes()[0])  # derived again once the startup model is in memory
    service = CaptureService(settings, registry, store, budget)
    readiness = Readiness()

    def load_startup_model() -> None:
        try:
            if settings.model:
                registry.load(settings.model)
            if settings.capture_budget_mb is None:
                # After loading: a model on the CPU takes its share of the memory first.
                limit, how = default_budget_bytes()
                budget.limit_bytes = limit
                log.info("capture budget: %.0f MiB of captures in flight (%s; --capture-budget-mb to set)",
                         limit / 2**20, how)
            readiness.ready.set()
            log.info("ready: %s", registry.ids())
        except CaptureError as exc:
            readiness.failure = exc.detail
            log.error("startup model failed to load: %s", exc.detail)
            if on_startup_failure:
                on_startup_failure(exc.detail)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so /health can answer 503 while the model loads.
        threading.Thread(target=load_startup_model, name="startup-load", daemon=True).start()
        yield
        # The storage writer is not shut down here: its thread is joined at exit, so
        # pending writes complete, and a second lifespan (schemathesis runs its own) still works.
        if owns_registry:
            registry.shutdown()

    app = FastAPI(title="NNsight capture reference server", version=PROTOCOL_VERSION, lifespan=lifespan)
    # Added last = runs first: the key is checked before any body is read.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key)
    app.state.settings, app.state.registry, app.state.store, app.state.readiness = settings, registry, store, readiness
    app.state.service = service
    app.state.budget = budget

    # Every error answer is built by errors.error_body: the protocol's `detail` and OpenAI's `error` envelope.
    @app.exception_handler(CaptureError)
    async def capture_error(request: Request, exc: CaptureError) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, json_safe(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each error's input: NaN, inf or a lone surrogate
        # there makes the 422 itself fail to serialise, and the client gets a 500.
        errors = validation_detail(exc.errors())
        where = [".".join(str(part) for part in e.get("loc", ()) if part != "body") for e in errors]
        message = "; ".join(f"{w or 'body'}: {e.get('msg', 'invalid')}" for w, e in zip(where, errors))
        return JSONResponse(error_body(422, errors, message=message, param=where[0] if where else None),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own errors: an unknown path (404), a wrong method (405).
        return JSONResponse(error_body(exc.status_code, exc.detail), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Log the traceback here; never send it.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__})"), status_code=500)

    def require_ready() -> None:
        if not readiness.ready.is_set():
            raise NotReady(readiness.failure or "the startup model is still loading")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not readiness.ready.is_set():
            body = {"status": "failed", "detail": readiness.failure} if readiness.failure else {"status": "loading"}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "loaded_models": registry.ids(), "protocol": PROTOCOL_VERSION,
                             "capture_budget": budget.snapshot()})

    @app.get("/v1/models")
    async def models() -> dict:
        require_ready()
        return service.models_list()

    @app.post("/models/load")
    async def load_model(req: LoadRequest) -> dict:
        require_ready()
        import anyio

        # Loading takes seconds to minutes: off the event loop.
        await anyio.to_thread.run_sync(registry.load, req.model_id, req.device_map, req.dtype)
        return {"ok": True, "model": registry.loaded_id(req.model_id) or req.model_id}

    @app.post("/test_pure_nnsight")
    async def test_pure_nnsight(req: PureRequest, request: Request):
        require_ready()
        return await _unless_disconnected(request, service.pure_nnsight(req))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        require_ready()
        if not req.stream:
            return await _unless_disconnected(request, service.chat_completion(req))
        prepared = service.prepare_chat(req)  # a refused request is a 4xx (or the budget's 503), not a stream

        async def events():
            try:
                async for chunk in service.chat_completion_stream(prepared):
                    yield f"data: {json.dumps(chunk)}\n\n"
            except CaptureError as exc:  # the status line is sent already: report in the stream
                yield f"data: {json.dumps(_stream_error(exc.status_code, exc.detail))}\n\n"
            except Exception as exc:
                log.exception("streamed generation failed")
                yield f"data: {json.dumps(_stream_error(500, f'internal error ({type(exc).__name__})'))}\n\n"
            finally:
                prepared.reservation.release()  # the capture's files are written (or it failed)
            yield "data: [DONE]\n\n"

        # The background task releases the budget too when the stream never started (idempotent).
        return StreamingResponse(events(), media_type="text/event-stream",
                                 background=BackgroundTask(prepared.reservation.release))

    # A sync endpoint on purpose: it runs in anyio's thread pool, which is what
    # nnsight's `.save` mount breaks; the tests download through it after nnsight loaded.
    @app.get("/v1/activations/{run_id}/{name}")
    def get_activation(run_id: str, name: str) -> StreamingResponse:
        # Opened here, before the status line: a DELETE racing this download removes the
        # run's name, not the open file, so the client gets all of it or a 404, never a cut body.
        handle, size = store.open_file(run_id, name)
        return StreamingResponse(_read_chunks(handle), media_type="application/octet-stream",
                                 headers={"content-length": str(size)})

    @app.delete("/v1/activations/{run_id}", status_code=204)
    async def delete_run(run_id: str) -> Response:
        import anyio

        # In a thread: it waits for the storage lock, which a large write holds for seconds.
        await anyio.to_thread.run_sync(store.delete_run, run_id)
        return Response(status_code=204)

    return app
