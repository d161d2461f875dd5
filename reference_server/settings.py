"""Server settings: one immutable object, made by the CLI or by a test, passed to the app factory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID


@dataclass(frozen=True)
class Settings:
    model: str | None = TINY_MODEL_ID  # loaded at start; None starts with no model
    host: str = "127.0.0.1"
    port: int = 8006
    device: str = "auto"
    dtype: str = "auto"
    storage_dir: Path = Path("capture-storage")
    max_new_tokens_limit: int = 4096
    default_max_tokens: int = 16
    log_level: str = "info"
    max_batch: int | None = None  # concurrent greedy requests per generate; None: 8 for float32 models, else 1
    max_batch_tokens: int = 8192  # padded size of one batched generate: rows x (longest prompt + longest max_tokens)
    max_loaded_models: int = 4  # /models/load refuses (409) beyond this many
    api_key: str | None = None  # every endpoint but /health then needs "Authorization: Bearer <key>"
    max_body_bytes: int = 1 << 20
    max_savepoints: int = 64
    max_capture_mb: float = 8192.0  # what one request may capture, computed before generating
    capture_budget_mb: float | None = None  # worst-case host memory of all captures in flight; None: half the available
    max_storage_mb: float | None = None  # retention limit of the storage directory
    storage_policy: str = "evict"  # over max_storage_mb: "evict" the oldest runs, or "refuse" (507)
    recycle_mb: float = 256.0  # deleted runs' files kept for later captures to write over (spare_files.py)
    # What POST /models/load may open besides the startup model and the built-in tiny models (registry.LoadPolicy).
    allow_load: tuple[str, ...] = ()
    allow_any_load: bool = False
    # Slow clients (uvicorn has no header or body read timeout of its own; see docs/reliability.md).
    header_timeout_s: float = 30.0  # request headers complete within this of connecting or of the last response
    body_timeout_s: float = 30.0  # each piece of a request body within this, else 408
    drain_timeout_s: float = 30.0  # on SIGTERM, requests in flight get this long, then the server exits
