"""The FastAPI app, built by a factory from the state it is given.

``create_app(settings)`` makes its own registry and store; tests pass their
own. No module-level mutable state: two apps in one process do not share
anything.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admission import CaptureBudget, default_budget_bytes
from .errors import CaptureError, error_body
from .guards import ApiKeyGuard, BodySizeLimit
from .input_rules import json_safe, validation_detail
from .registry import LoadPolicy, ModelRegistry
from .routes import ACTIVATION_ROUTE, PROTOCOL_VERSION, router
from .service import CaptureService
from .settings import Settings
from .storage import RunStore

log = logging.getLogger(__name__)


class Readiness:
    """Whether the startup model is usable; set once by the loading thread."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.failure: str | None = None


def create_app(
    settings: Settings,
    registry: ModelRegistry | None = None,
    store: RunStore | None = None,
    on_startup_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    owns_registry = registry is None  # shut down only what this app made
    registry = registry or ModelRegistry(device=settings.device, dtype=settings.dtype, max_batch=settings.max_batch,
                                         max_batch_tokens=settings.max_batch_tokens,
                                         max_loaded=settings.max_loaded_models,
                                         policy=LoadPolicy(settings.allow_load, allow_any=settings.allow_any_load,
                                                           startup=settings.model))
    store = store or RunStore(
        settings.storage_dir,
        max_bytes=None if settings.max_storage_mb is None else int(settings.max_storage_mb * 2**20),
        policy=settings.storage_policy,
        recycle_bytes=int(settings.recycle_mb * 2**20),
    )
    if settings.capture_budget_mb is not None:
        budget = CaptureBudget(int(settings.capture_budget_mb * 2**20))
        log.info("capture budget: %.0f MiB of captures in flight (--capture-budget-mb)", budget.limit_bytes / 2**20)
    else:
        budget = CaptureBudget(default_budget_bytes()[0])  # derived again once the startup model is in memory
    # Download URLs come from the route itself, so the service never spells the path.
    service = CaptureService(settings, registry, store, budget,
                             activation_url=lambda run_id, name: app.url_path_for(ACTIVATION_ROUTE, run_id=run_id,
                                                                                  name=name))
    readiness = Readiness()

    def load_startup_model() -> None:
        try:
            if settings.model:
                registry.load(settings.model)
                registry.pin(settings.model)  # the startup model cannot be unloaded
            if registry.policy is not None:
                log.info("load policy: %s", registry.policy.describe())
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
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, read_timeout_s=settings.body_timeout_s)
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
        # OpenAI's param is null for an error of the whole body, not "".
        return JSONResponse(error_body(422, errors, message=message, param=(where[0] or None) if where else None),
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

    app.include_router(router)
    return app
