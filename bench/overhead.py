"""``capture-bench overhead``: what capture costs a client, measured from outside, with a gate.

A client times the same greedy request (``--tokens`` new tokens, the latency prompt)
on the server with and without capture, in interleaved pairs: pair i sends the plain
request first when i is even and the capture request first when i is odd, so neither
always runs on a warmer (or a busier) machine. Each pair gives one ratio of ms per
completion token, capture over plain; a run's figure is the median of its ``--pairs``
ratios, and its noise is the standard error of that median, estimated from the same
ratios (1.253 x 1.4826 x MAD / sqrt(pairs): the median's standard error under a normal
spread, with the MAD standing in for the standard deviation so one stalled request
does not inflate it).

The gate: a run fails a variant with a target when its median exceeds the target by more
than its own noise (``median > target + noise``). A quiet machine has little noise, so
the gate is strict there; a busy one widens it by what it measured, never by a constant.
Exit status 0, 2 when a gated variant failed in any run or something else went wrong.

Pure functions (``pair_ratios``, ``summarise_run``, ``gate``) are unit-tested without a server.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID

TARGET = 1.05

# name -> (what it captures, the target or None: reported only)
VARIANTS = {
    "lm_head": ("all-token _logits (the model's head), generated positions, float32, .pt", TARGET),
    "layers": ("every decoder block's output (the discovered block stack), generated positions, float32, .pt", TARGET),
    "prompt": ("_logits at every prompt position (positions: \"prompt\"), .pt", None),
    "sequence": ("_logits at every prompt and completion position (positions: \"sequence\": one more "
                 "forward step), .pt", None),
}


def capture_for(variant: str, selectors) -> dict:
    """The capture of an overhead variant; ``selectors``: the served model's head and blocks (server.Selectors)."""
    if variant == "lm_head":
        return {"savepoints": [selectors.logits()], "format": "pt"}
    if variant == "layers":
        return {"savepoints": selectors.layers(), "format": "pt"}
    if variant in ("prompt", "sequence"):
        return {"savepoints": [selectors.logits()], "positions": variant, "format": "pt"}
    raise ValueError(f"not an overhead variant: {variant!r}")


# -- pure parts ----------------------------------------------------------------------------


def pair_ratios(pairs: list[dict]) -> list[float]:
    """Per pair, capture ms/token over plain ms/token."""
    return [(p["capture_ms"] / p["capture_tokens"]) / (p["plain_ms"] / p["plain_tokens"]) for p in pairs]


def median_noise(values: list[float]) -> float:
    """The standard error of the median of ``values``, from their MAD (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mid = statistics.median(values)
    mad = statistics.median(abs(v - mid) for v in values)
    return 1.253 * 1.4826 * mad / math.sqrt(len(values))


def summarise_run(pairs: list[dict], target: float | None) -> dict:
    ratios = pair_ratios(pairs)
    median = statistics.median(ratios)
    noise = median_noise(ratios)
    cpu = [p["capture_cpu_ms"] / p["plain_cpu_ms"] for p in pairs
           if p.get("capture_cpu_ms") is not None and p.get("plain_cpu_ms")]
    return {"pairs": len(ratios), "ratios": ratios, "median": median, "min": min(ratios), "max": max(ratios),
            "noise": noise, "cpu_ratio_median": statistics.median(cpu) if cpu else None,
            "target": target, "passed": gate(median, noise, target)}


def gate(median: float, noise: float, target: float | None) -> bool | None:
    """True when ``median`` is within ``target`` plus the run's own noise; None without a target."""
    if target is None:
        return None
    return median <= target + noise


def summarise(runs: list[dict]) -> dict:
    """Per variant over runs: each run's median, their median and range, and whether every run passed."""
    out = {}
    for name in VARIANTS:
        medians = [run[name]["median"] for run in runs if name in run]
        if not medians:
            continue
        passed = [run[name]["passed"] for run in runs if name in run]
        out[name] = {"run_medians": medians, "median": statistics.median(medians), "min": min(medians),
                     "max": max(medians), "noise": [run[name]["noise"] for run in runs if name in run],
                     "target": VARIANTS[name][1],
                     "passed": None if VARIANTS[name][1] is None else all(passed)}
    return out


def render(results: dict) -> str:
    lines = [f"capture overhead from outside: {results['options']['pairs']} interleaved pairs per run, "
             f"{results['options']['tokens']} new tokens, model {results['model']}; "
             f"{results['machine'].get('cpu')} ({results['machine'].get('cpu_count')} CPUs), "
             f"load average {results['load_avg_start']} -> {results['load_avg_end']}", ""]
    from .stats import markdown_table

    rows = []
    for r, run in enumerate(results["runs"], 1):
        for name, s in run.items():
            rows.append([name, str(r), f"{s['median']:.3f}", f"{s['noise']:.3f}", f"{s['min']:.3f}-{s['max']:.3f}",
                         "-" if s["cpu_ratio_median"] is None else f"{s['cpu_ratio_median']:.3f}",
                         "-" if s["target"] is None else f"<= {s['target']}",
                         "-" if s["passed"] is None else ("pass" if s["passed"] else "FAIL")])
    lines.append(markdown_table(["variant", "run", "median x plain", "noise (SE)", "pair range", "CPU x plain",
                                 "target", "gate"], rows))
    lines += ["", "Over runs (median of the runs' medians, range):"]
    for name, s in results["summary"].items():
        verdict = "" if s["passed"] is None else ("  every run passed its gate" if s["passed"] else "  GATE FAILED")
        lines.append(f"  {name:8s} {s['median']:.3f}  ({s['min']:.3f}-{s['max']:.3f}; runs: "
                     + ", ".join(f"{m:.3f}" for m in s["run_medians"]) + f"){verdict}")
    for p in results["problems"]:
        lines.append(f"  !! {p}")
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capture-bench overhead",
        description="Capture overhead measured by a client: the same greedy request with and without capture, in "
                    "interleaved pairs; per run the median ratio and its noise (standard error of the median). "
                    f"Gate: a run fails a variant with a target ({TARGET} for lm_head and layers) when its median "
                    "exceeds the target by more than its own noise; exit status 2 then.")
    p.add_argument("--runs", type=int, default=1, help="runs, each with its own pairs (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=8, help="interleaved plain/capture pairs per run and variant "
                                                        "(default: %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, of " + ", ".join(VARIANTS) + " (default: all)")
    p.add_argument("--target", type=float, default=TARGET,
                   help="the ratio lm_head and layers are gated at (default: %(default)s)")
    p.add_argument("--model", default=TINY_MODEL_ID, help="model id or directory for the server (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="(default: %(default)s: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the server; default 1 on CPU (steady on a shared machine), torch's own on CUDA")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG", help="extra server argument, repeatable")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests of each kind first (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("overhead-results.json"), help="results JSON (default: %(default)s)")
    return p


def _timed(server, body: dict, timeout: float) -> tuple[float, int, float | None]:
    cpu0 = server.cpu_s()
    ms, data = server.chat(body, timeout)
    cpu1 = server.cpu_s()
    server.delete(data.get("activation_run_id"))  # after the CPU reading: deleting is not part of the request
    cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1e3
    return ms, data["usage"]["completion_tokens"], cpu


def measure(server, variants: list[str], pairs: int, tokens: int, target: float,
            warmup: int = 2, timeout: float = 600) -> dict:
    """One run: ``pairs`` interleaved pairs per variant; the variants take turns pair by pair."""
    from capture_conformance.harness.protocol.client import chat_body

    from .cli import LATENCY_PROMPT

    plain = chat_body(server.model_id, LATENCY_PROMPT, tokens)
    bodies = {v: chat_body(server.model_id, LATENCY_PROMPT, tokens, capture=capture_for(v, server.selectors)) for v in variants}
    for _ in range(warmup):
        for v in variants:
            _timed(server, plain, timeout)
            _timed(server, bodies[v], timeout)
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(pairs):
        for v in variants:
            order = ["plain", "capture"] if i % 2 == 0 else ["capture", "plain"]
            pair = {"pair": i, "order": order[0] + " first"}
            for kind in order:
                ms, n, cpu = _timed(server, plain if kind == "plain" else bodies[v], timeout)
                pair.update({f"{kind}_ms": ms, f"{kind}_tokens": n, f"{kind}_cpu_ms": cpu})
            samples[v].append(pair)
    out = {}
    for v in variants:
        summary = summarise_run(samples[v], target if VARIANTS[v][1] is not None else None)
        out[v] = {**summary, "samples": samples[v]}
    return out


def _load_avg():
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    from .cli import log, machine_info, versions
    from .server import ServerHandle

    args = build_parser().parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"capture-bench overhead: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    for name in ("runs", "pairs", "tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"capture-bench overhead: --{name} must be at least 1")
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    dtype = args.dtype if args.dtype != "auto" else ("float32" if args.device == "cpu" else "bfloat16")
    tmp = Path(tempfile.mkdtemp(prefix="capture-overhead-"))
    started, load_start = time.time(), _load_avg()
    problems: list[str] = []
    runs: list[dict] = []
    server = ServerHandle.start(args.model, args.device, dtype, tmp / "storage", tmp / "server.log", args.server_arg,
                                None, threads)
    try:
        server.wait_ready(timeout=900)
        for r in range(args.runs):
            try:
                runs.append(measure(server, variants, args.pairs, args.tokens, args.target, args.warmup))
            except Exception as exc:  # noqa: BLE001 - reported; the results so far are kept
                problems.append(f"run {r + 1} failed: {exc}")
                break
            log(f"overhead run {r + 1}/{args.runs}: " + ", ".join(
                f"{v} {runs[-1][v]['median']:.3f}±{runs[-1][v]['noise']:.3f}" for v in variants))
    finally:
        server.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    results = {
        "schema": "capture-bench-overhead/1",
        "command": "capture-bench overhead " + " ".join(argv if argv is not None else sys.argv[2:]),
        "duration_s": round(time.time() - started, 1),
        "machine": machine_info(), "versions": versions(), "load_avg_start": load_start, "load_avg_end": _load_avg(),
        "model": server.model_id or args.model,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "variants": {v: VARIANTS[v][0] for v in variants},
        "runs": [{v: {k: x for k, x in s.items()} for v, s in run.items()} for run in runs],
        "problems": problems,
    }
    results["summary"] = summarise(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(render(results))
    print(f"\nresults: {args.out}  ({results['duration_s']:.0f} s)")
    failed = [name for name, s in results["summary"].items() if s["passed"] is False]
    if failed:
        print(f"\n!! gate failed for {', '.join(failed)}: a run's median exceeded {args.target} by more than its noise",
              file=sys.stderr)
    return 2 if failed or problems or not runs else 0
