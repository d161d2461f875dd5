"""The HTTP routes of the capture protocol, on one ``APIRouter``.

Each route gets what it needs through dependencies: the app's service, store,
registry and readiness (``app.state``, set by ``create_app``), and ``ready``,
which answers 503 until the startup model is usable. No route reaches into a
closure of the app factory, so the router is the whole HTTP surface, in one place.
"""

from __future__ import annotations

import asyncio
import json
import logging

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from .errors import CaptureError, NotReady, error_body
from .registry import ModelRegistry
from .schemas import ChatRequest, LoadRequest, PureRequest, UnloadRequest
from .service import CaptureService
from .storage import RunStore

log = logging.getLogger(__name__)
PROTOCOL_VERSION = "1.1"
ACTIVATION_ROUTE = "get_activation"  # the route name the service builds download URLs from


def service(request: Request) -> CaptureService:
    return request.app.state.service


def store(request: Request) -> RunStore:
    return request.app.state.store


def registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def ready(request: Request) -> None:
    """503 until the startup model is usable (or with the reason it failed to load)."""
    readiness = request.app.state.readiness
    if not readiness.ready.is_set():
        raise NotReady(readiness.failure or "the startup model is still loading")


router = APIRouter()
serving = [Depends(ready)]


@router.get("/health")
@router.head("/health", include_in_schema=False)  # what probes and `curl -I` send; one operation in the schema
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    if not state.readiness.ready.is_set():
        failure = state.readiness.failure
        body = {"status": "failed", "detail": failure} if failure else {"status": "loading"}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok", "loaded_models": state.registry.ids(), "protocol": PROTOCOL_VERSION,
                         "capture_budget": state.budget.snapshot(), "layout": state.registry.layout()})


@router.get("/v1/models", dependencies=serving)
async def models(svc: CaptureService = Depends(service)) -> dict:
    return svc.models_list()


@router.post("/models/load", dependencies=serving)
async def load_model(req: LoadRequest, models: ModelRegistry = Depends(registry)) -> dict:
    # Loading takes seconds to minutes: off the event loop.
    await anyio.to_thread.run_sync(models.load, req.model_id, req.device_map, req.dtype)
    return {"ok": True, "model": models.loaded_id(req.model_id) or req.model_id}


@router.post("/models/unload", dependencies=serving)
async def unload_model(req: UnloadRequest, models: ModelRegistry = Depends(registry)) -> dict:
    # A model loaded by request; the startup model is 409. In a thread: it waits for a load in progress.
    unloaded = await anyio.to_thread.run_sync(models.unload, req.model_id)
    return {"ok": True, "model": unloaded}


@router.post("/test_pure_nnsight", dependencies=serving)
async def test_pure_nnsight(req: PureRequest, request: Request, svc: CaptureService = Depends(service)):
    return await _unless_disconnected(request, svc.pure_nnsight(req))


@router.post("/v1/chat/completions", dependencies=serving)
async def chat_completions(req: ChatRequest, request: Request, svc: CaptureService = Depends(service)):
    if not req.stream:
        return await _unless_disconnected(request, svc.chat_completion(req))
    prepared = svc.prepare_chat(req)  # a refused request is a 4xx (or the budget's 503), not a stream

    async def events():
        try:
            async for chunk in svc.chat_completion_stream(prepared):
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
@router.get("/v1/activations/{run_id}/{name}", name=ACTIVATION_ROUTE)
def get_activation(run_id: str, name: str, runs: RunStore = Depends(store)) -> StreamingResponse:
    # Opened here, before the status line: a DELETE racing this download removes the
    # run's name, not the open file, so the client gets all of it or a 404, never a cut body.
    handle, size = runs.open_file(run_id, name)
    return StreamingResponse(_read_chunks(handle), media_type="application/octet-stream",
                             headers={"content-length": str(size)})


@router.delete("/v1/activations/{run_id}", status_code=204)
async def delete_run(run_id: str, runs: RunStore = Depends(store)) -> Response:
    # In a thread: it waits for the storage lock, which a large write holds for seconds.
    await anyio.to_thread.run_sync(runs.delete_run, run_id)
    return Response(status_code=204)


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
