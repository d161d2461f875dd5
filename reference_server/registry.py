"""Loaded models, each with the one worker thread that runs its traces.

nnsight 0.8 cannot run two traces on one model at once, so every call that
touches a model goes through that model's single worker thread: calls are
serialised per model by construction, and the event loop only awaits a future,
so ``/health`` and other requests are answered while a generation runs. A
client that disconnects does not cancel the call: the worker finishes it and
moves on, so no lock is ever left held.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from fixtures.tiny_model import resolve_model_path

from .errors import NotFound, Unprocessable

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelWorker:
    def __init__(self, model):
        self.model = model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{model.model_id}")

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return await asyncio.wrap_future(self._executor.submit(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class ModelRegistry:
    """Model id -> worker. Loading is serialised; a failed load changes nothing."""

    def __init__(self, device: str = "auto", dtype: str = "auto", loader: Callable | None = None):
        self.device = device
        self.dtype = dtype
        self._loader = loader
        self._workers: dict[str, ModelWorker] = {}
        self._load_lock = threading.Lock()

    def _load(self, model_id: str, device: str, dtype: str):
        if self._loader is not None:
            return self._loader(model_id, device, dtype)
        from .nnsight_core import CaptureModel  # heavy import, only where a model is loaded

        return CaptureModel.load(model_id, resolve_model_path(model_id), device=device, dtype=dtype)

    def load(self, model_id: str, device: str | None = None, dtype: str | None = None) -> bool:
        """Load ``model_id`` unless it is loaded already; True if this call loaded it."""
        with self._load_lock:
            if model_id in self._workers:
                return False
            try:
                model = self._load(model_id, device or self.device, dtype or self.dtype)
            except (OSError, ValueError, EnvironmentError) as exc:
                log.warning("loading %r failed: %s", model_id, exc)
                raise NotFound(f"model {model_id!r} could not be loaded: {_first_line(exc)}") from None
            except Exception as exc:  # a broken checkpoint must not take the server down
                log.exception("loading %r failed", model_id)
                raise Unprocessable(f"model {model_id!r} could not be loaded: {_first_line(exc)}") from None
            self._workers[model_id] = ModelWorker(model)
            return True

    def get(self, model_id: str | None) -> ModelWorker:
        if model_id is None:
            if not self._workers:
                raise NotFound("no model is loaded")
            return next(iter(self._workers.values()))
        worker = self._workers.get(model_id)
        if worker is None:
            raise NotFound(f"model {model_id!r} is not loaded (loaded: {sorted(self._workers)})")
        return worker

    def ids(self) -> list[str]:
        return list(self._workers)

    def workers(self) -> list[ModelWorker]:
        return list(self._workers.values())

    def shutdown(self) -> None:
        for worker in self._workers.values():
            worker.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
