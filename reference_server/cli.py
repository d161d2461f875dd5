"""``capture-server`` / ``python -m capture_conformance.reference_server``: start the reference capture server."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID
from capture_conformance.fixtures.zoo import BUILTIN_IDS

from .guards import LOOPBACK_BINDS, LoopbackHostGuard
from .settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capture-server",
        description="NNsight activation-capture server speaking capture protocol v1 (see docs/protocol.md).",
    )
    parser.add_argument("--model", default=TINY_MODEL_ID,
                        help=f"model to load at start: a built-in model, built locally on first use ({', '.join(BUILTIN_IDS)}), "
                             "a local directory or a hub id (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8006, help="port (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the model runs; auto = cuda when available (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model weights' dtype; auto = float32 on CPU, bfloat16 on CUDA (default: %(default)s)")
    parser.add_argument("--tp", type=_positive_int, default=1, metavar="N",
                        help="tensor parallelism: shard the model over N ranks with transformers' tp_plan=\"auto\" "
                             "(NCCL on GPUs, one per rank; gloo on CPU), started here with torch.distributed.run; "
                             "under torchrun by hand (multi-node) N must equal WORLD_SIZE. Rank 0 serves HTTP. "
                             "Turns off mid-generation cancellation and loading other models; see "
                             "docs/tensor-parallel.md (default: %(default)s)")
    parser.add_argument("--storage-dir", type=Path, default=Path("capture-storage"),
                        help="where captured tensors are written, one directory per run (default: %(default)s)")
    parser.add_argument("--max-new-tokens-limit", type=int, default=4096,
                        help="largest max_tokens a request may ask for (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="(default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="concurrent greedy requests served by one generate; 1 turns batching off. Default: 8 for "
                             "float32 models, 1 for bfloat16/float16, whose batched results round differently from "
                             "solo runs and can change greedy ids")
    parser.add_argument("--max-batch-tokens", type=int, default=8192,
                        help="padded size of one batched generate, rows x (longest prompt + longest max_tokens): "
                             "a request that would take a batch past it waits for the next one; a single request "
                             "over it runs alone (default: %(default)s)")
    parser.add_argument("--max-loaded-models", type=int, default=4,
                        help="most models loaded at once; /models/load beyond it is 409, POST /models/unload frees "
                             "a slot (default: %(default)s)")
    parser.add_argument("--allow-load", action="append", default=[], metavar="PATH_OR_ID",
                        help="a model id or local directory that POST /models/load may open (repeatable); a "
                             "directory allows every directory below it. Always allowed: the startup model and the "
                             "built-in tiny models (built locally, no network). Anything else is 403")
    parser.add_argument("--allow-any-load", action="store_true",
                        help="let POST /models/load open ANY local directory this process can read and any hub id "
                             "(a download unless HF_HUB_OFFLINE=1): for a trusted client only")
    # One key variable for every tool; CAPTURE_SERVER_API_KEY is the older name, still read.
    parser.add_argument("--api-key", default=os.environ.get("CAPTURE_API_KEY") or os.environ.get("CAPTURE_SERVER_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (the scheme in any case) on every endpoint but "
                             "/health (default: $CAPTURE_API_KEY, or its older name $CAPTURE_SERVER_API_KEY; none). "
                             "A key on the command line shows in ps: prefer the variable or --api-key-file")
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="PATH",
                        help="read the key from this file (its first line; surrounding whitespace dropped), so that "
                             "it shows neither in ps nor in the environment; overrides --api-key")
    parser.add_argument("--header-timeout-s", type=float, default=30.0,
                        help="close a connection whose request headers are not complete this many seconds after it "
                             "opened or after its previous response (uvicorn has no such timeout; nginx's is 60 s) "
                             "(default: %(default)s)")
    parser.add_argument("--body-timeout-s", type=float, default=30.0,
                        help="408 when a piece of a request body does not arrive within this many seconds "
                             "(default: %(default)s)")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0,
                        help="on SIGTERM or Ctrl-C, requests in flight get this many seconds to finish, then the "
                             "server exits (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest request body; larger is 413 (default: %(default)s)")
    parser.add_argument("--max-savepoints", type=int, default=64,
                        help="most savepoints one request may ask for (default: %(default)s)")
    parser.add_argument("--max-capture-mb", type=float, default=8192.0,
                        help="most MiB one request may capture, computed before generating as "
                             "max_tokens x width x itemsize per savepoint; more is 422 (default: %(default)s)")
    parser.add_argument("--capture-budget-mb", type=float, default=None,
                        help="most MiB of host memory that all captures in flight may hold together, counted as "
                             "2 x each request's worst-case capture size until its files are written; a request "
                             "that would go over is answered 503 with Retry-After (default: half the memory "
                             "available once the startup model is loaded, stated in the log)")
    parser.add_argument("--max-storage-mb", type=float, default=None,
                        help="retention limit of the storage directory (default: none)")
    parser.add_argument("--storage-policy", choices=["evict", "refuse"], default="evict",
                        help="over --max-storage-mb: evict the oldest runs, or refuse with 507 (default: %(default)s)")
    parser.add_argument("--recycle-mb", type=_non_negative_float, default=256, metavar="MB",
                        help="deleted runs' files kept, up to this many MiB, for later captures to write over: "
                             "their pages are in memory already, which makes storing a capture several times "
                             "cheaper (docs/performance.md); never a file still open; 0 deletes at once "
                             "(default: %(default)s)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        storage_dir=args.storage_dir,
        max_new_tokens_limit=args.max_new_tokens_limit,
        log_level=args.log_level,
        max_batch=args.max_batch,
        max_batch_tokens=args.max_batch_tokens,
        max_loaded_models=args.max_loaded_models,
        api_key=_api_key(args),
        max_body_bytes=args.max_body_bytes,
        max_savepoints=args.max_savepoints,
        max_capture_mb=args.max_capture_mb,
        capture_budget_mb=args.capture_budget_mb,
        max_storage_mb=args.max_storage_mb,
        storage_policy=args.storage_policy,
        recycle_mb=args.recycle_mb,
        allow_load=tuple(args.allow_load),
        allow_any_load=args.allow_any_load,
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
    )


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is None:
        return args.api_key or None
    try:
        lines = args.api_key_file.read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"capture-server: cannot read --api-key-file {args.api_key_file}: {exc}") from None
    if not lines or not lines[0].strip():
        raise SystemExit(f"capture-server: --api-key-file {args.api_key_file} is empty")
    return lines[0].strip()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    if args.tp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank of a TP group, or its launcher
        import sys

        from .distributed import main as tensor_parallel_main

        tensor_parallel_main(args.tp, sys.argv[1:] if argv is None else list(argv), settings, serve)
        return
    serve(settings)


def serve(settings: Settings, app_factory: Callable[..., FastAPI] | None = None) -> None:
    """Run the app that ``app_factory`` (default: ``create_app``) makes from ``settings`` until stopped."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.host in ("0.0.0.0", "::", "") and not settings.api_key:
        logging.getLogger("capture-server").warning(
            "bound to all interfaces (%s) without --api-key: anyone who can reach this port can run the model "
            "and fill the disk", settings.host or "*")
    if settings.allow_any_load:
        logging.getLogger("capture-server").warning(
            "--allow-any-load: POST /models/load opens ANY local directory this process can read and any hub id "
            "(a download unless HF_HUB_OFFLINE=1)%s", "" if settings.api_key else ", for any client: no --api-key")
    import uvicorn

    from .app import create_app
    from .malloc_tuning import keep_freed_memory

    keep_freed_memory()  # a process-wide allocator setting: the server process's, never a library's
    server: uvicorn.Server | None = None

    def stop_on_failure(reason: str) -> None:
        # A server whose startup model cannot load is of no use: exit non-zero, not 503 forever.
        if server is not None:
            server.should_exit = True
            server.startup_failed_reason = reason

    app = (app_factory or create_app)(settings, on_startup_failure=stop_on_failure)
    if not settings.api_key and settings.host in LOOPBACK_BINDS:
        app = LoopbackHostGuard(app)  # a browser page on a rebound name must not reach a keyless local server
    from .http_timeouts import with_header_timeout

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            http=with_header_timeout(settings.header_timeout_s),
                            # uvicorn takes whole seconds; at least 1 so that a drain never waits for ever.
                            timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)))
    server = uvicorn.Server(config)
    server.startup_failed_reason = None
    server.run()
    if server.startup_failed_reason:
        raise SystemExit(f"capture-server: startup model failed to load: {server.startup_failed_reason}")


if __name__ == "__main__":
    main()
