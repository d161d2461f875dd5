"""Medians, ratios, targets, tables and the results' schema: pure functions over plain dicts.

Samples are dicts so they go into the JSON as they are:
latency ``{"rep": int, "ms": float, "tokens": int}``; concurrency
``{"rep": int, "wall_s": float, "tokens": int, "requests": int}``.
"""

from __future__ import annotations

import math
import statistics

from .variants import RATIOS, TARGETS, concurrency_name

SCHEMA = "capture-bench/1"


# -- numbers -------------------------------------------------------------------------


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def spread(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def per_token_ms(sample: dict) -> float | None:
    return sample["ms"] / sample["tokens"] if sample.get("tokens") else None


def per_token_cpu_ms(sample: dict) -> float | None:
    cpu = sample.get("cpu_ms")
    return cpu / sample["tokens"] if cpu is not None and sample.get("tokens") else None


def summarise_latency(samples: list[dict]) -> dict:
    return {
        "n": len(samples),
        "ms_per_request": spread(s["ms"] for s in samples),
        "ms_per_token": spread(per_token_ms(s) for s in samples),
        # CPU time of the process doing the work (this one for anchors, the server's for server variants):
        # less sensitive than wall time to other work on a shared machine; includes busy-waiting threads.
        "cpu_ms_per_token": spread(per_token_cpu_ms(s) for s in samples),
        "tokens": spread(s["tokens"] for s in samples),
    }


def paired_ratio(numerator: list[dict], denominator: list[dict]) -> float | None:
    """Median over repetitions of the per-repetition ratio of ms per token.

    Variants run round-robin within a repetition, so a pair shares the machine's
    state of the moment; this is less sensitive to drift than a ratio of medians.
    """
    by_rep = {s["rep"]: per_token_ms(s) for s in denominator}
    return median(ratio(per_token_ms(s), by_rep.get(s["rep"])) for s in numerator)


def compute_ratios(summary: dict, samples: dict) -> list[dict]:
    """Each ratio of :data:`RATIOS` whose two variants were measured (ms per token)."""
    out = []
    for spec in RATIOS:
        if spec.numerator not in summary or spec.denominator not in summary:
            continue
        out.append({
            "name": spec.name,
            "numerator": spec.numerator,
            "denominator": spec.denominator,
            "meaning": spec.meaning,
            "ratio": ratio(summary[spec.numerator]["ms_per_token"]["median"],
                           summary[spec.denominator]["ms_per_token"]["median"]),
            "paired_median": paired_ratio(samples[spec.numerator], samples[spec.denominator]),
            # The least disturbed run of each: on a shared machine other work only ever adds time.
            "of_minimums": ratio(summary[spec.numerator]["ms_per_token"]["min"],
                                 summary[spec.denominator]["ms_per_token"]["min"]),
            "cpu": ratio(summary[spec.numerator].get("cpu_ms_per_token", {}).get("median"),
                         summary[spec.denominator].get("cpu_ms_per_token", {}).get("median")),
        })
    return out


def summarise_concurrency(samples: list[dict]) -> dict:
    throughputs = [s["tokens"] / s["wall_s"] for s in samples if s["wall_s"] > 0]
    return {
        "n": len(samples),
        "throughput_tok_s": spread(throughputs),
        "wall_s": spread(s["wall_s"] for s in samples),
        "tokens": spread(s["tokens"] for s in samples),
        "server_cpu_ms_per_token": spread(s["server_cpu_s"] * 1e3 / s["tokens"] for s in samples
                                          if s.get("server_cpu_s") is not None and s["tokens"]),
        "requests": samples[0]["requests"] if samples else 0,
    }


def throughput_ratios(concurrency: dict) -> dict:
    """``{"k4/k1": x, "k8/k1": y}`` from the median throughputs (needs K = 1)."""
    base = concurrency.get("1", {}).get("throughput_tok_s", {}).get("median")
    return {
        f"k{k}/k1": ratio(level["throughput_tok_s"]["median"], base)
        for k, level in sorted(concurrency.items(), key=lambda kv: int(kv[0]))
        if k != "1"
    }


# -- targets -------------------------------------------------------------------------


def evaluate_targets(results: dict) -> list[dict]:
    """Each target of the issue for this run's device: its value, limit and met (None: not measured)."""
    device = "cuda" if str(results.get("model", {}).get("device", "cpu")).startswith("cuda") else "cpu"
    ratios = {r["name"]: r["ratio"] for r in results.get("ratios", [])}
    out = []
    for target in TARGETS:
        limit = target.limits.get(device)
        value, met, note = None, None, ""
        if target.kind == "ratio":
            value = ratios.get(target.key)
            if limit is None:
                note = "a GPU target; shown for reference"
            elif value is not None:
                met = value <= limit
        elif target.kind == "throughput":
            value = results.get("throughput_ratios", {}).get(target.key.split()[0])
            if value is not None and limit is not None:
                met = value >= limit
        elif target.kind == "bool":
            consistency = results.get("consistency")
            if consistency and consistency.get("checked"):
                value = consistency["ok"]
                met = bool(value)
        elif target.kind == "soak":
            soak = results.get("soak")
            if soak:
                value = soak.get("growth_mb")
                met = soak.get("flat")
        out.append({"key": target.key, "text": target.text, "device": device, "limit": limit,
                    "value": value, "met": met, "note": note})
    return out


# -- tables --------------------------------------------------------------------------


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table with padded columns (readable as plain text too)."""
    cells = [headers] + rows
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def latency_table(results: dict) -> str:
    summary = results.get("latency", {})
    base_none = summary.get("server-none", {}).get("ms_per_token", {}).get("median")
    base_gen = summary.get("hf-generate", {}).get("ms_per_token", {}).get("median")
    rows = []
    for name, s in summary.items():
        tok = s["ms_per_token"]
        rows.append([
            name,
            fmt(s["ms_per_request"]["median"]),
            fmt(tok["median"], 2),
            f"{fmt(tok['min'], 2)}-{fmt(tok['max'], 2)}",
            fmt(s["tokens"]["median"], 0) if s["tokens"]["median"] is not None else "-",
            str(s["n"]),
            fmt(ratio(tok["median"], base_none), 2),
            fmt(ratio(tok["median"], base_gen), 2),
            fmt(s.get("cpu_ms_per_token", {}).get("median"), 2),
        ])
    return markdown_table(
        ["variant", "ms/request", "ms/token", "ms/token range", "tokens", "n", "x server-none", "x hf-generate",
         "CPU ms/token"], rows)


def ratios_table(results: dict) -> str:
    rows = [[r["name"], f"{r['numerator']} / {r['denominator']}", fmt(r["ratio"], 3), fmt(r["paired_median"], 3),
             fmt(r.get("of_minimums"), 3), fmt(r.get("cpu"), 3)]
            for r in results.get("ratios", [])]
    return markdown_table(["ratio (ms/token)", "variants", "of medians", "paired median", "of minimums",
                           "of CPU ms/token"], rows)


def throughput_table(results: dict) -> str:
    conc = results.get("concurrency", {})
    rows = []
    base = conc.get("1", {}).get("throughput_tok_s", {}).get("median")
    for k, level in sorted(conc.items(), key=lambda kv: int(kv[0])):
        tp = level["throughput_tok_s"]
        rows.append([
            concurrency_name(int(k)),
            str(level["requests"]),
            fmt(level["tokens"]["median"], 0) if level["tokens"]["median"] is not None else "-",
            fmt(level["wall_s"]["median"], 2),
            fmt(tp["median"], 1),
            f"{fmt(tp['min'], 1)}-{fmt(tp['max'], 1)}",
            fmt(ratio(tp["median"], base), 2),
            fmt(level.get("server_cpu_ms_per_token", {}).get("median"), 2),
            str(level.get("mismatches", 0)),
            fmt(level.get("max_abs_diff"), 6) if level.get("max_abs_diff") is not None else "-",
            str(level["n"]),
        ])
    return markdown_table(["clients", "requests", "tokens", "wall s", "tok/s", "tok/s range", "x K=1",
                           "server CPU ms/token", "id mismatches", "max |diff| vs solo", "n"], rows)


def targets_table(results: dict) -> str:
    rows = []
    for t in results.get("targets", []):
        status = "-" if t["met"] is None else ("met" if t["met"] else "MISSED")
        limit = t["limit"]
        if t["key"] == "k8/k1 throughput" and limit is not None:
            limit_text = f">= {limit}"
        elif isinstance(limit, bool) or limit is None:
            limit_text = "-" if limit is None else "required"
        else:
            limit_text = f"<= {limit}"
        value = t["value"]
        value_text = fmt(value, 3) if isinstance(value, float) else fmt(value)
        if t["key"] == "soak rss flat" and value is not None:
            value_text = f"{value:+.1f} MiB"
        rows.append([t["text"], limit_text, value_text, status + (f" ({t['note']})" if t["note"] else "")])
    return markdown_table(["target (" + (results.get("targets") or [{}])[0].get("device", "?") + ")", "limit", "value", "status"], rows)


def memory_lines(results: dict) -> list[str]:
    mem = results.get("memory") or {}
    lines = []
    if mem:
        lines.append(
            "server RSS: start {} MiB, end {} MiB, peak (VmHWM) {} MiB".format(
                fmt(mem.get("rss_start_mb")), fmt(mem.get("rss_end_mb")), fmt(mem.get("peak_end_mb"))))
    soak = results.get("soak")
    if soak:
        lines.append(
            "soak: {} requests of {} tokens: RSS {} -> {} MiB (after the first tenth {} MiB), "
            "peak {} -> {} MiB (after the first tenth {} MiB); growth after the first tenth {} MiB: {}".format(
                soak["requests"], soak["tokens"], fmt(soak["rss_before_mb"]), fmt(soak["rss_after_mb"]),
                fmt(soak["rss_warm_mb"]), fmt(soak["peak_before_mb"]), fmt(soak["peak_after_mb"]),
                fmt(soak["peak_warm_mb"]), fmt(soak["growth_mb"]), "flat" if soak["flat"] else "GROWING"))
    return lines


def render_report(results: dict) -> str:
    model = results.get("model", {})
    machine = results.get("machine", {})
    opts = results.get("options", {})
    head = (f"model {model.get('name')} ({model.get('num_layers')} layers, hidden {model.get('hidden_size')}, "
            f"vocab {model.get('vocab_size')}) on {model.get('device')} {model.get('dtype')}; "
            f"{opts.get('tokens')} new tokens, {opts.get('reps')} reps, "
            f"{machine.get('torch_threads')} torch thread(s) per process; "
            f"{machine.get('gpu') or machine.get('cpu')} ({machine.get('cpu_count')} CPUs)")
    load = machine.get("load_avg_start")
    if load:
        head += f"; load average at start {load[0]}, at end {(machine.get('load_avg_end') or ['?'])[0]}"
    parts = [head, "", "Latency, medians over repetitions (ms per token = ms per request / completion tokens; "
             "CPU ms/token: CPU time of the process doing the work, the server's for server-*):", "",
             latency_table(results)]
    if results.get("ratios"):
        parts += ["", "Ratios of ms per token:", "", ratios_table(results)]
    if results.get("concurrency"):
        parts += ["", "Concurrent clients, greedy, all-token _logits (tok/s = completion tokens / wall time):", "",
                  throughput_table(results)]
    lines = memory_lines(results)
    if lines:
        parts += [""] + lines
    if results.get("targets"):
        parts += ["", "Targets (issue 6):", "", targets_table(results)]
    problems = results.get("problems") or []
    if problems:
        parts += ["", "PROBLEMS:"] + [f"  !! {p}" for p in problems]
    return "\n".join(parts)


# -- schema --------------------------------------------------------------------------


def validate_results(results: dict) -> list[str]:
    """What is missing or malformed in a results dict; empty when it follows the schema."""
    problems = []
    if results.get("schema") != SCHEMA:
        problems.append(f"schema is {results.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("machine", "versions", "options", "model", "latency", "ratios", "concurrency", "throughput_ratios",
                "consistency", "memory", "targets", "problems", "checks", "duration_s"):
        if key not in results:
            problems.append(f"missing {key!r}")
    for key in ("python", "torch", "transformers", "nnsight"):
        if key not in results.get("versions", {}):
            problems.append(f"versions lacks {key!r}")
    for key in ("cpu", "cpu_count", "gpu"):
        if key not in results.get("machine", {}):
            problems.append(f"machine lacks {key!r}")
    for name, s in results.get("latency", {}).items():
        for field in ("n", "ms_per_request", "ms_per_token", "tokens", "samples", "group", "description"):
            if field not in s:
                problems.append(f"latency[{name!r}] lacks {field!r}")
    for k, level in results.get("concurrency", {}).items():
        if not str(k).isdigit():
            problems.append(f"concurrency key {k!r} is not a client count")
        for field in ("throughput_tok_s", "wall_s", "tokens", "requests", "samples", "mismatches"):
            if field not in level:
                problems.append(f"concurrency[{k!r}] lacks {field!r}")
    return problems
