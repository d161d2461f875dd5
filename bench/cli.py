"""``python -m capture_conformance.bench``: options, the measuring loop, the report.

Order of a run: start the server (it loads while this process loads the
anchors), verify each variant once (stored tensors have the advertised shape,
greedy argmax equals the ids), warm up, then ``--reps`` repetitions of every
latency variant in round-robin order; then the concurrency levels, also
round-robin, each checked against solo runs; then memory (and the soak).
Exit status 0, or 2 when something was wrong (a mismatch, a failed check, a
failed request): the results are written either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID

from . import stats
from .models import SHAPES
from .variants import LATENCY_VARIANTS, VARIANT_NAMES, concurrency_name, parse_int_list, round_robin, select

# The latency prompt and the concurrency prompts: on the tiny model none reaches
# EOS within 58 new tokens, and their lengths differ (left padding when batched).
LATENCY_PROMPT = "Tell me a short story about a fox."
CONCURRENCY_PROMPTS = [
    "Tell me a short story about a fox.",
    "Tell me a short story about a cat.",
    "Tell me a short story about an owl.",
    "Tell me a story about a bear.",
    "Tell me a short story about a rabbit.",
    "Tell me a long story about a wolf.",
    "Please tell me a short story about a little fox.",
    "Tell me a short story about a dog.",
]

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capture-bench",
        description="What activation capture costs: plain transformers, a forward hook, nnsight, and the reference "
                    "server with and without capture, side by side; K concurrent clients; server memory.",
        epilog="capture-bench overhead [--runs N] [--pairs 8]: the outside ratio alone (a client timing the same "
               "greedy request with and without capture in interleaved pairs), with its noise and the 1.05 gate; "
               "see capture-bench overhead --help.",
    )
    p.add_argument("--model", default=TINY_MODEL_ID, help="model id or local directory (default: %(default)s)")
    p.add_argument("--model-shape", choices=sorted(SHAPES), default=None,
                   help="build (once, into the cache) and use a random-weight model of this exact configuration")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights; auto = float32 on CPU, bfloat16 on CUDA (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request (default: %(default)s)")
    p.add_argument("--force-tokens", action="store_true",
                   help="make the in-process variants generate exactly --tokens (min_new_tokens; costs about 3 ms "
                        "per token on a small CPU at vocabulary 151936); by default every variant generates as the "
                        "server does, stopping at EOS, and figures are per token")
    p.add_argument("--reps", type=int, default=7, help="measured repetitions of each latency variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant first (default: %(default)s)")
    p.add_argument("--concurrency", default="1,4,8", help="client counts, comma-separated (default: %(default)s)")
    p.add_argument("--concurrency-reps", type=int, default=3, help="repetitions of each client count (default: %(default)s)")
    p.add_argument("--requests-per-client", type=int, default=2,
                   help="requests each concurrent client sends back to back (default: %(default)s)")
    p.add_argument("--no-tensor-check", action="store_true",
                   help="compare only ids, not the concurrent runs' logits, with the solo runs")
    p.add_argument("--soak-requests", type=int, default=0,
                   help="after the rest, send this many capture requests and report the server's memory (default: off)")
    p.add_argument("--soak-tokens", type=int, default=16, help="new tokens per soak request (default: %(default)s)")
    p.add_argument("--only", action="append", default=None, metavar="PATTERN",
                   help="run only these variants (shell globs, repeatable or comma-separated; e.g. 'server-*', "
                        "'hf-generate,server-k*'). Variants: " + ", ".join(VARIANT_NAMES) + ", server-k<K>")
    p.add_argument("--skip-server", action="store_true", help="anchors only: no server, no concurrency")
    p.add_argument("--skip-anchors", action="store_true", help="no in-process variants")
    p.add_argument("--skip-concurrency", action="store_true")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the server, repeatable (e.g. --server-arg=--max-batch=8)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="start the server with --tp N (tensor parallelism over N ranks, see docs/tensor-parallel.md); "
                        "its memory and CPU figures are then the launcher's, not the ranks' (default: %(default)s)")
    p.add_argument("--server-url", default=None,
                   help="measure an already running server instead of starting one (memory needs --server-pid)")
    p.add_argument("--server-pid", type=int, default=None, help="pid of the --server-url server, for its memory")
    p.add_argument("--api-key", default=os.environ.get("CAPTURE_API_KEY") or os.environ.get("CAPTURE_SERVER_API_KEY") or None,
                   help="bearer key for the server (default: $CAPTURE_API_KEY, or its older name "
                        "$CAPTURE_SERVER_API_KEY; none)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch in this process and in the server (OMP_NUM_THREADS); 0: torch's own "
                        "choice; default: 1 on CPU, torch's choice on CUDA. One thread per process keeps CPU figures "
                        "steady on a shared machine: with two, a parallel region stalls (spinning) whenever another "
                        "program displaces one of its threads, and timings jump tenfold")
    p.add_argument("--timeout", type=float, default=600, help="seconds per request (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench-results.json"), help="results JSON (default: %(default)s)")
    return p


# -- machine and versions -------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    info = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "gpu": None,
            "torch_threads": torch.get_num_threads()}
    try:
        import psutil

        info["cpu_physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "nnsight", "fastapi", "uvicorn", "safetensors", "requests"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["project_commit"] = (commit + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        out["project_commit"] = None
    return out


# -- the run ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.problems: list[str] = []
        self.checks: dict[str, str] = {}
        self.samples: dict[str, list[dict]] = {}
        self.server = None
        self.hf = None
        self.nn = None
        self.argv: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)
        log("!! " + text)

    # -- variants ------------------------------------------------------------------------

    def run_variant(self, name: str, verify: bool = False) -> tuple[float, int, float | None]:
        """One request of variant ``name``: (wall ms, generated tokens, CPU ms of the process that did the work)."""
        if name.startswith("server-"):
            cpu0 = self.server.cpu_s()
            ms, n = self._run_variant(name, verify)
            cpu1 = self.server.cpu_s()
            return ms, n, None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1e3
        cpu0 = time.process_time()
        ms, n = self._run_variant(name, verify)
        return ms, n, (time.process_time() - cpu0) * 1e3

    def _run_variant(self, name: str, verify: bool) -> tuple[float, int]:
        from capture_conformance.harness.protocol.client import chat_body

        from .server import capture_for

        tokens = self.args.tokens
        if name == "hf-generate":
            ms, n, _ = self.hf.run_plain(self.prompt_ids, tokens, self.args.force_tokens)
        elif name == "hf-hooks-logits":
            ms, n, (captured, ids) = self.hf.run_hooked(self.prompt_ids, tokens, self.args.force_tokens)
            if verify:
                self._check(name, captured, ids, [1, len(ids), None])
        elif name == "nnsight-logits":
            ms, n, (captured, ids) = self.nn.run(self.prompt_ids, tokens, self.args.force_tokens)
            if verify:
                self._check(name, captured, ids, [1, len(ids), None])
        else:
            capture = capture_for(name, self.server.selectors)
            ms, data = self.server.chat(chat_body(self.server.model_id, LATENCY_PROMPT, tokens, capture=capture), self.args.timeout)
            n = data["usage"]["completion_tokens"]
            if verify:
                self._verify_server(name, capture, data)
            self.server.delete(data.get("activation_run_id"))
        return ms, n

    def _check(self, name: str, captured, ids: list[int], shape: list) -> None:
        """Shape and greedy argmax (ties allowed: the chosen id's logit equals the step's maximum)."""
        import torch

        want = [captured.shape[i] if s is None else s for i, s in enumerate(shape)]
        if list(captured.shape) != want:
            self.checks[name] = f"shape {list(captured.shape)}, expected {want}"
        else:
            logits = captured[0].float()
            chosen = logits.gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
            ok = bool((chosen >= logits.max(-1).values).all())
            self.checks[name] = "ok" if ok else "argmax of the captured logits differs from the generated ids"
        if self.checks[name] != "ok":
            self.problem(f"check of {name}: {self.checks[name]}")

    def _verify_server(self, name: str, capture: dict | None, data: dict) -> None:
        if capture is None:
            self.checks[name] = "ok" if data.get("usage", {}).get("completion_tokens") else "no usage in the response"
            if self.checks[name] != "ok":
                self.problem(f"check of {name}: {self.checks[name]}")
            return
        ids = data.get("completion_token_ids") or []
        meta = data.get("activations_meta") or {}
        names = [sp["name"] for sp in capture["savepoints"]]
        missing = [n for n in names if n not in meta]
        if missing or not ids:
            self.checks[name] = f"response lacks {missing or 'completion_token_ids'}"
            self.problem(f"check of {name}: {self.checks[name]}")
            return
        last = capture.get("tokens") == "last"
        tensor = self.server.fetch(data["activation_run_id"], "_logits", capture.get("format", "pt"))
        positions = capture.get("positions", "generated")
        if positions != "generated":
            # [1, P, V] or [1, P+N, V]: the prompt's last position predicts token 0, P-1+i predicts token i.
            p = data.get("usage", {}).get("prompt_tokens", 0)
            length = p if positions == "prompt" else p + len(ids)
            if tensor.shape[1] != length:
                self.checks[name] = f"_logits has {tensor.shape[1]} positions, expected {length} ({positions})"
                self.problem(f"check of {name}: {self.checks[name]}")
                return
            window = tensor[:, p - 1:] if positions == "prompt" else tensor[:, p - 1:p + len(ids) - 1]
            self._check(name, window, ids[:1] if positions == "prompt" else ids, [1, window.shape[1], None])
            return
        self._check(name, tensor, ids[-1:] if last else ids, [1, 1 if last else len(ids), None])
        if self.checks[name] == "ok" and len(names) > 1:  # a decoder layer: [1, N, hidden]
            layer = self.server.fetch(data["activation_run_id"], names[-1], capture.get("format", "pt"))
            want = [1, len(ids), self.server.capture_info.get("hidden_size", layer.shape[-1])]
            if list(layer.shape) != want:
                self.checks[name] = f"{names[-1]} has shape {list(layer.shape)}, expected {want}"
                self.problem(f"check of {name}: {self.checks[name]}")

    # -- phases --------------------------------------------------------------------------

    def latency(self, names: list[str]) -> None:
        a = self.args
        for name in names:
            self.samples[name] = []
        for w in range(max(a.warmup, 1)):
            for name in round_robin(names, w):
                try:
                    self.run_variant(name, verify=(w == 0))
                except Exception as exc:  # noqa: BLE001 - reported, and the variant dropped
                    self.problem(f"{name} failed in warm-up: {exc}")
                    names = [n for n in names if n != name]
                    self.samples.pop(name, None)
        log(f"warm-up done ({max(a.warmup, 1)} untimed pass(es), checks: "
            + ", ".join(f"{k}={v}" for k, v in self.checks.items()) + ")")
        for rep in range(a.reps):
            for name in round_robin(names, rep):
                try:
                    ms, n, cpu_ms = self.run_variant(name)
                except Exception as exc:  # noqa: BLE001
                    self.problem(f"{name} failed in rep {rep}: {exc}")
                    continue
                self.samples[name].append({"rep": rep, "ms": ms, "tokens": n, "cpu_ms": cpu_ms})
            log(f"rep {rep + 1}/{a.reps}: " + ", ".join(
                f"{n}={self.samples[n][-1]['ms']:.0f}ms" for n in names if self.samples[n]))

    def concurrency(self, levels: list[int]) -> dict:
        from capture_conformance.harness.protocol.client import chat_body

        a = self.args
        body = {"savepoints": [self.server.selectors.logits()], "format": "pt"}
        per_client = a.requests_per_client
        plan = {k: [[CONCURRENCY_PROMPTS[(c * per_client + j) % len(CONCURRENCY_PROMPTS)] for j in range(per_client)]
                     for c in range(k)] for k in levels}
        used = sorted({p for k in levels for client in plan[k] for p in client}, key=CONCURRENCY_PROMPTS.index)
        solo: dict[str, tuple[list[int], object]] = {}
        for prompt in used:  # solo references (and the concurrency warm-up)
            _, data = self.server.chat(chat_body(self.server.model_id, prompt, a.tokens, capture=body), a.timeout)
            logits = None if a.no_tensor_check else self.server.fetch(data["activation_run_id"], "_logits", "pt")
            solo[prompt] = (data["completion_token_ids"], logits)
            self.server.delete(data["activation_run_id"])
        log(f"solo references: {len(used)} prompts, "
            + ", ".join(str(len(ids)) for ids, _ in solo.values()) + " tokens")

        def run_level(k: int, check_tensors: bool) -> dict:
            results: list[list] = [[None] * per_client for _ in range(k)]
            errors: list[str] = []
            barrier = threading.Barrier(k + 1)

            def client(c: int) -> None:
                barrier.wait()
                for j, prompt in enumerate(plan[k][c]):
                    try:
                        _, data = self.server.chat(chat_body(self.server.model_id, prompt, a.tokens, capture=body), a.timeout)
                        results[c][j] = (prompt, data)
                    except Exception as exc:  # noqa: BLE001
                        errors.append(str(exc)[:300])

            threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(k)]
            for t in threads:
                t.start()
            cpu0 = self.server.cpu_s()
            barrier.wait()
            start = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            cpu1 = self.server.cpu_s()
            done = [r for client_results in results for r in client_results if r is not None]
            mismatches, max_diff = [], None
            for prompt, data in done:
                ids, ref = solo[prompt]
                if data["completion_token_ids"] != ids:
                    first = next((i for i, (x, y) in enumerate(zip(data["completion_token_ids"], ids)) if x != y),
                                 min(len(ids), len(data["completion_token_ids"])))
                    mismatches.append(f"K={k} prompt {prompt!r}: ids differ from the solo run from token {first} "
                                      f"({len(data['completion_token_ids'])} vs {len(ids)} tokens)")
                elif check_tensors and ref is not None:
                    got = self.server.fetch(data["activation_run_id"], "_logits", "pt")
                    diff = float((got.float() - ref.float()).abs().max()) if got.shape == ref.shape else float("inf")
                    max_diff = diff if max_diff is None else max(max_diff, diff)
            for _, data in done:
                self.server.delete(data.get("activation_run_id"))
            return {"wall_s": wall, "tokens": sum(d["usage"]["completion_tokens"] for _, d in done),
                    "server_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
                    "requests": k * per_client, "completed": len(done), "errors": errors,
                    "mismatches": mismatches, "max_abs_diff": max_diff}

        if a.warmup > 0:
            run_level(max(levels), check_tensors=False)
            log(f"concurrency warm-up at K={max(levels)} done")
        out = {str(k): {"samples": [], "mismatch_details": [], "max_abs_diff": None} for k in levels}
        for rep in range(a.concurrency_reps):
            for k in round_robin(levels, rep):
                level = run_level(k, check_tensors=(rep == 0 and not a.no_tensor_check))
                entry = out[str(k)]
                for err in level["errors"]:
                    self.problem(f"K={k} rep {rep}: request failed: {err}")
                for m in level["mismatches"]:
                    self.problem("MISMATCH concurrent vs solo: " + m)
                entry["mismatch_details"] += level["mismatches"]
                if level["max_abs_diff"] is not None:
                    entry["max_abs_diff"] = max(entry["max_abs_diff"] or 0.0, level["max_abs_diff"])
                if level["completed"] == level["requests"]:
                    entry["samples"].append({"rep": rep, "wall_s": level["wall_s"], "tokens": level["tokens"],
                                             "requests": level["requests"], "server_cpu_s": level["server_cpu_s"]})
            log(f"concurrency rep {rep + 1}/{a.concurrency_reps}: " + ", ".join(
                f"K={k} {out[str(k)]['samples'][-1]['tokens'] / out[str(k)]['samples'][-1]['wall_s']:.0f} tok/s"
                for k in levels if out[str(k)]["samples"]))
        summary = {}
        for k, entry in out.items():
            summary[k] = {**stats.summarise_concurrency(entry["samples"]),
                          "requests": len(plan[int(k)]) * per_client,
                          "samples": entry["samples"], "mismatches": len(entry["mismatch_details"]),
                          "mismatch_details": entry["mismatch_details"][:20], "max_abs_diff": entry["max_abs_diff"]}
        tol = 1e-3 if self.dtype == "float32" else 0.25
        for k, level in summary.items():
            if level["max_abs_diff"] is not None and level["max_abs_diff"] > tol:
                self.problem(f"K={k}: concurrent logits differ from solo by up to {level['max_abs_diff']:.3g} "
                             f"(more than {tol} for {self.dtype})")
        return summary

    def soak(self) -> dict:
        from capture_conformance.harness.protocol.client import chat_body

        from .server import capture_for

        a = self.args
        n = a.soak_requests
        variants = ["server-logits-pt", "server-logits-safetensors", "server-logits-layers", "server-logits-last"]
        bodies = [chat_body(self.server.model_id, CONCURRENCY_PROMPTS[i % len(CONCURRENCY_PROMPTS)], a.soak_tokens,
                            capture=capture_for(v, self.server.selectors)) for i, v in enumerate(variants)]
        rss_before, peak_before = self.server.rss_mb(), self.server.peak_mb()
        every = max(1, n // 10)
        points = []
        start = time.perf_counter()
        for i in range(n):
            _, data = self.server.chat(bodies[i % len(bodies)], a.timeout)
            self.server.delete(data.get("activation_run_id"))
            if (i + 1) % every == 0 or i + 1 == n:
                points.append({"requests": i + 1, "rss_mb": self.server.rss_mb(), "peak_mb": self.server.peak_mb()})
                if (i + 1) % (every * 2) == 0:
                    log(f"soak {i + 1}/{n}: RSS {points[-1]['rss_mb']:.0f} MiB, peak {points[-1]['peak_mb'] or 0:.0f} MiB")
        rss_after, peak_after = self.server.rss_mb(), self.server.peak_mb()
        warm = points[0]
        peak_growth = None if peak_after is None or warm["peak_mb"] is None else peak_after - warm["peak_mb"]
        rss_growth = None if rss_after is None or warm["rss_mb"] is None else rss_after - warm["rss_mb"]
        growth = peak_growth if peak_growth is not None else rss_growth
        # Allocators keep some slack: "flat" allows 5% of the warm figure or 32 MiB, whichever is more.
        tolerance = max(32.0, 0.05 * (warm["peak_mb"] or warm["rss_mb"] or 0))
        return {"requests": n, "tokens": a.soak_tokens, "variants": variants, "seconds": time.perf_counter() - start,
                "rss_before_mb": rss_before, "rss_after_mb": rss_after, "rss_warm_mb": warm["rss_mb"],
                "peak_before_mb": peak_before, "peak_after_mb": peak_after, "peak_warm_mb": warm["peak_mb"],
                "rss_growth_mb": rss_growth, "peak_growth_mb": peak_growth, "growth_mb": growth,
                "tolerance_mb": tolerance, "flat": growth is not None and growth <= tolerance, "points": points}

    # -- driver --------------------------------------------------------------------------

    def run(self) -> dict:
        import torch

        from . import anchors, models
        from .server import ServerHandle

        a = self.args
        only = [p.strip() for item in (a.only or []) for p in item.split(",") if p.strip()] or None
        device = anchors.resolve_device(a.device)
        if a.threads is None:
            a.threads = 1 if device == "cpu" else 0
        if a.threads:
            torch.set_num_threads(a.threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("capture-bench: --device cuda but torch sees no CUDA device")
        self.dtype = anchors.resolve_dtype(a.dtype, device)
        if a.model_shape and a.model != TINY_MODEL_ID:
            raise SystemExit("capture-bench: give --model or --model-shape, not both")
        levels = [] if (a.skip_server or a.skip_concurrency) else parse_int_list(a.concurrency)
        levels = [k for k in levels if select([concurrency_name(k)], only)]
        names = select(VARIANT_NAMES, only)
        groups = {v.name: v.group for v in LATENCY_VARIANTS}
        if a.skip_server:
            names = [n for n in names if groups[n] != "server"]
        if a.skip_anchors:
            names = [n for n in names if groups[n] != "anchor"]
        use_server = bool(levels or a.soak_requests or any(groups[n] == "server" for n in names))
        if not names and not levels and not a.soak_requests:
            raise SystemExit("capture-bench: nothing selected to measure")

        started = time.time()
        load_start = _load_avg()
        if a.server_url and not any(groups[n] == "anchor" for n in names):
            model_name, server_model, path = "(the running server's)", None, None  # nothing to load here
        else:
            model_name, server_model, path = models.resolve(a.model, a.model_shape, device, log=log)
        log(f"model {model_name} on {device} {self.dtype}; variants {names}; concurrency {levels}")
        tmp = Path(tempfile.mkdtemp(prefix="capture-bench-"))
        memory: dict = {}
        latency: dict = {}
        concurrency: dict = {}
        soak = None
        try:
            if use_server:
                if a.server_url:
                    self.server = ServerHandle.attach(a.server_url, a.server_pid, a.api_key)
                else:
                    self.server = ServerHandle.start(server_model, device, self.dtype, tmp / "storage",
                                                     tmp / "server.log", [*a.server_arg, *(["--tp", str(a.tp)] if a.tp > 1 else [])],
                                                     a.api_key, a.threads)
            if any(n.startswith("hf-") for n in names):
                self.hf = anchors.HFAnchor(path, device, self.dtype)
            if "nnsight-logits" in names:
                self.nn = anchors.NNsightAnchor(path, device, self.dtype)
            if self.server:
                self.server.wait_ready(timeout=900)
                memory["rss_start_mb"] = self.server.rss_mb()
                memory["peak_start_mb"] = self.server.peak_mb()
                if path is None:
                    model_name = self.server.model_id
                log(f"server ready at {self.server.url} (model {self.server.model_id}, RSS "
                    f"{stats.fmt(memory['rss_start_mb'], 0)} MiB)")
            if names:
                tokenizer = self.hf.tokenizer if self.hf else (self.nn.model.tokenizer if self.nn else None)
                self.prompt_ids = anchors.render_prompt(tokenizer, LATENCY_PROMPT) if tokenizer else []
                self.latency(names)
                latency = {n: {"group": groups[n], "description": next(v.description for v in LATENCY_VARIANTS
                                                                       if v.name == n),
                               **stats.summarise_latency(self.samples[n]), "samples": self.samples[n]}
                           for n in names if n in self.samples}
            if levels:
                concurrency = self.concurrency(levels)
            if self.server:
                memory["rss_end_mb"] = self.server.rss_mb()
                memory["peak_end_mb"] = self.server.peak_mb()
            if a.soak_requests and self.server:
                log(f"soak: {a.soak_requests} capture requests")
                soak = self.soak()
                memory["rss_end_mb"], memory["peak_end_mb"] = soak["rss_after_mb"], soak["peak_after_mb"]
        finally:
            if self.server:
                self.server.stop()
                if self.server.proc is not None and self.server.proc.returncode not in (0, -15, None):
                    self.problem(f"server exited with {self.server.proc.returncode}")
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

        info = self.server.capture_info if self.server else {}
        config = _config(path)
        results = {
            "schema": stats.SCHEMA,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "command": "python -m capture_conformance.bench " + shlex.join(self.argv),
            "machine": {**machine_info(), "load_avg_start": load_start, "load_avg_end": _load_avg()},
            "versions": versions(),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "api_key"},
            "model": {
                "name": model_name, "server_model_id": self.server.model_id if self.server else None, "path": path,
                "shape": a.model_shape, "device": device, "dtype": self.dtype,
                "num_layers": info.get("num_layers", config.get("num_hidden_layers")),
                "hidden_size": info.get("hidden_size", config.get("hidden_size")),
                "vocab_size": info.get("vocab_size", config.get("vocab_size")),
            },
            "server": {"command": self.server.command, "extra_args": a.server_arg, "url": self.server.url, "tp": a.tp}
            if self.server else None,
            "prompts": {"latency": LATENCY_PROMPT, "concurrency": CONCURRENCY_PROMPTS},
            "checks": self.checks,
            "latency": latency,
            "concurrency": concurrency,
            "memory": memory,
            "soak": soak,
        }
        results["ratios"] = stats.compute_ratios(latency, {n: s["samples"] for n, s in latency.items()})
        results["throughput_ratios"] = stats.throughput_ratios(concurrency)
        checked = bool(concurrency) and any(level["samples"] for level in concurrency.values())
        results["consistency"] = {"checked": checked,
                                  "ok": checked and all(level["mismatches"] == 0 for level in concurrency.values()),
                                  "mismatches": sum(level["mismatches"] for level in concurrency.values())}
        results["targets"] = stats.evaluate_targets(results)
        results["problems"] = self.problems
        return results


def _load_avg() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (others' work makes timings noisy)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _config(path: str | None) -> dict:
    if not path:
        return {}
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("tokens", "reps", "requests_per_client", "concurrency_reps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"capture-bench: --{name.replace('_', '-')} must be at least 1")
    bench = Bench(args)
    bench.argv = list(sys.argv[1:] if argv is None else argv)
    results = bench.run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(stats.render_report(results))
    print(f"\nresults: {args.out}  ({results['duration_s']:.0f} s)")
    if results["problems"]:
        print(f"\n!! {len(results['problems'])} problem(s), see above and 'problems' in the JSON", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
