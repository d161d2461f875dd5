"""The benchmark: its pure parts (medians, ratios, targets, tables, schema) and one tiny real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from capture_conformance.bench import stats
from capture_conformance.bench.server import Selectors, capture_for
from capture_conformance.bench.variants import RATIOS, VARIANT_NAMES, concurrency_name, parse_int_list, round_robin, select

ROOT = Path(__file__).resolve().parent.parent


def samples(*ms_tokens):
    return [{"rep": i, "ms": ms, "tokens": tok} for i, (ms, tok) in enumerate(ms_tokens)]


def test_median_ratio_spread():
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([1.0, 2.0, None, 3.0, 4.0]) == 2.5
    assert stats.median([]) is None
    assert stats.ratio(3.0, 2.0) == 1.5
    assert stats.ratio(1.0, 0) is None and stats.ratio(None, 1.0) is None
    assert stats.spread([5, 1, 3]) == {"median": 3, "min": 1, "max": 5}


def test_latency_summary_is_per_token_and_paired_ratio_pairs_repetitions():
    s = stats.summarise_latency(samples((100.0, 10), (300.0, 10), (200.0, 20)))
    assert s["n"] == 3
    assert s["ms_per_request"]["median"] == 200.0
    assert s["ms_per_token"] == {"median": 10.0, "min": 10.0, "max": 30.0}
    # Per repetition 2.0, 1.0, 3.0: the median of the pairs is 2.0, whatever the medians' ratio is.
    num = samples((20.0, 1), (20.0, 1), (30.0, 1))
    den = samples((10.0, 1), (20.0, 1), (10.0, 1))
    assert stats.paired_ratio(num, den) == 2.0


def test_ratios_only_for_measured_pairs():
    lat = {n: stats.summarise_latency(samples((10.0 * (i + 1), 10))) for i, n in enumerate(VARIANT_NAMES)}
    raw = {n: samples((10.0 * (i + 1), 10)) for i, n in enumerate(VARIANT_NAMES)}
    ratios = stats.compute_ratios(lat, raw)
    assert [r["name"] for r in ratios] == [spec.name for spec in RATIOS]
    by = {r["name"]: r for r in ratios}
    pt, none = VARIANT_NAMES.index("server-logits-pt") + 1, VARIANT_NAMES.index("server-none") + 1
    assert by["capture/no-capture (pt)"]["ratio"] == pytest.approx(pt / none)
    assert by["capture/no-capture (pt)"]["paired_median"] == pytest.approx(pt / none)
    only_server = {k: v for k, v in lat.items() if k.startswith("server-")}
    names = {r["name"] for r in stats.compute_ratios(only_server, raw)}
    assert "capture/no-capture (pt)" in names and "capture/plain generate" not in names


def conc_level(k, tok_s, n=3):
    smp = [{"rep": i, "wall_s": 1.0, "tokens": tok_s, "requests": k} for i in range(n)]
    return {**stats.summarise_concurrency(smp), "samples": smp, "mismatches": 0, "mismatch_details": [],
            "max_abs_diff": 0.0}


def synthetic_results(device="cpu", pt=105.0, none=100.0, k8=180.0):
    values = {n: 100.0 for n in VARIANT_NAMES} | {"server-logits-pt": pt, "server-none": none}
    raw = {n: samples((v, 10), (v, 10)) for n, v in values.items()}
    latency = {n: {"group": "x", "description": "d", **stats.summarise_latency(s), "samples": s} for n, s in raw.items()}
    concurrency = {"1": conc_level(1, 100.0), "4": conc_level(4, 150.0), "8": conc_level(8, k8)}
    results = {
        "schema": stats.SCHEMA, "duration_s": 1.0,
        "machine": {"cpu": "test cpu", "cpu_count": 2, "gpu": None},
        "versions": {"python": "3", "torch": "2", "transformers": "5", "nnsight": "0.8"},
        "options": {"tokens": 10, "reps": 2},
        "model": {"name": "m", "device": device, "dtype": "float32", "num_layers": 2, "hidden_size": 8, "vocab_size": 9},
        "latency": latency, "concurrency": concurrency, "memory": {"rss_start_mb": 1.0, "rss_end_mb": 2.0, "peak_end_mb": 2.0},
        "soak": None, "checks": {}, "problems": [],
        "consistency": {"checked": True, "ok": True, "mismatches": 0},
    }
    results["ratios"] = stats.compute_ratios(latency, raw)
    results["throughput_ratios"] = stats.throughput_ratios(concurrency)
    results["targets"] = stats.evaluate_targets(results)
    return results


def test_targets_met_and_missed_per_device():
    cpu = {t["key"]: t for t in synthetic_results("cpu", pt=105.0, k8=180.0)["targets"]}
    assert cpu["capture/no-capture (pt)"]["met"] is True
    assert cpu["capture/no-capture (pt)"]["value"] == pytest.approx(1.05)
    assert cpu["capture/plain generate"]["met"] is None  # a GPU-only target
    assert cpu["k8/k1 throughput"]["value"] == pytest.approx(1.8) and cpu["k8/k1 throughput"]["met"] is True
    assert cpu["concurrent == solo"]["met"] is True
    assert cpu["soak rss flat"]["met"] is None  # no soak in this run
    gpu = {t["key"]: t for t in synthetic_results("cuda", pt=120.0, k8=180.0)["targets"]}
    assert gpu["capture/no-capture (pt)"]["met"] is False  # 1.2 > 1.1
    assert gpu["capture/plain generate"]["met"] is True  # 1.2 <= 1.2
    assert gpu["k8/k1 throughput"]["met"] is False  # 1.8 < 3 on a GPU


def test_table_formatting():
    table = stats.markdown_table(["a", "long header"], [["xyz", "1"], ["q", "22"]])
    lines = table.splitlines()
    assert lines[0] == "| a   | long header |"
    assert lines[1] == "|-----|-------------|"
    assert lines[2] == "| xyz | 1           |"
    assert len({len(line) for line in lines}) == 1
    assert stats.fmt(None) == "-" and stats.fmt(1.23456, 2) == "1.23" and stats.fmt(True) == "yes"


def test_report_and_schema():
    results = synthetic_results()
    report = stats.render_report(results)
    for name in VARIANT_NAMES + [concurrency_name(k) for k in (1, 4, 8)]:
        assert f"| {name} " in report
    assert "capture/no-capture (pt)" in report and "MISSED" not in report.split("Targets")[0]
    assert stats.validate_results(results) == []
    json.dumps(results)  # serialisable as it is
    broken = dict(results)
    del broken["versions"]
    assert "missing 'versions'" in stats.validate_results(broken)


def test_variant_selection_and_order():
    assert parse_int_list("8,1, 4,4") == [1, 4, 8]
    with pytest.raises(ValueError):
        parse_int_list("0,2")
    assert round_robin([1, 2, 3], 0) == [1, 2, 3] and round_robin([1, 2, 3], 4) == [2, 3, 1]
    assert select(VARIANT_NAMES, None) == VARIANT_NAMES
    assert select(VARIANT_NAMES, ["server-logits-*"]) == [n for n in VARIANT_NAMES if n.startswith("server-logits-")]
    assert select(["server-k1", "server-k8"], ["server-k8"]) == ["server-k8"]


# A GPT-NeoX-Japanese-like layout as a server lists it: the bench must capture its head and blocks, whatever their names.
NEOX_LIST = ["embed_out", "gpt_neox_japanese.embed_in", "gpt_neox_japanese.final_layer_norm",
             *[f"gpt_neox_japanese.layers.{i}{sub}" for i in range(3)
               for sub in ("", ".attention", ".mlp", ".mlp.dense_4h_to_h", ".input_layernorm")]]


def _selectors():
    from capture_conformance.harness.protocol.layout import layout_from_selectors

    return Selectors.of(layout_from_selectors(NEOX_LIST))


def test_capture_bodies_use_the_discovered_head_and_blocks():
    selectors = _selectors()
    assert capture_for("server-none", selectors) is None
    assert capture_for("server-logits-safetensors", selectors)["format"] == "safetensors"
    assert capture_for("server-logits-last", selectors)["tokens"] == "last"
    layers = capture_for("server-logits-layers", selectors)["savepoints"]
    # From a server's list the head is the protocol's alias: the name rules do not know embed_out is it.
    assert [sp["selector"] for sp in layers] == ["logits", "gpt_neox_japanese.layers[0]",
                                                 "gpt_neox_japanese.layers[1]", "gpt_neox_japanese.layers[2]"]


def test_shape_model_build(tmp_path, monkeypatch):
    """The --model-shape builder, with a small shape: config as given, the tiny model's tokenizer and template."""
    from transformers import AutoConfig, AutoTokenizer

    from capture_conformance.bench import models

    monkeypatch.setitem(models.SHAPES, "test-mini", {
        "vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "tie_word_embeddings": True})
    monkeypatch.setattr(models, "shape_dir", lambda shape: tmp_path / shape)
    path = models.ensure_shape_model("test-mini", log=lambda msg: None)
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim, config.vocab_size) == (64, 1, 32, 151936)
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(path).apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    assert models.ensure_shape_model("test-mini") == path  # built once


def test_qwen3_shape_is_qwen3_0_6b():
    from capture_conformance.bench.models import SHAPES

    shape = SHAPES["qwen3-0.6b"]
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"],
            shape["num_key_value_heads"], shape["head_dim"], shape["intermediate_size"], shape["vocab_size"],
            shape["tie_word_embeddings"]) == (1024, 28, 16, 8, 128, 3072, 151936, True)


def test_tiny_bench_run(tmp_path):
    """A real run, as small as it gets: every variant measured, positive numbers, the JSON valid."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "capture_conformance.bench", "--tokens", "2", "--reps", "1", "--warmup", "0", "--concurrency-reps", "1",
         "--requests-per-client", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert stats.validate_results(results) == []
    assert list(results["latency"]) == VARIANT_NAMES
    for name, s in results["latency"].items():
        assert s["ms_per_token"]["median"] > 0 and s["tokens"]["median"] == 2, name
        assert f"| {name} " in proc.stdout
    assert all(v == "ok" for v in results["checks"].values()), results["checks"]
    for k in ("1", "4", "8"):
        assert results["concurrency"][k]["throughput_tok_s"]["median"] > 0
        assert results["concurrency"][k]["mismatches"] == 0
        assert f"| {concurrency_name(int(k))} " in proc.stdout
    assert results["consistency"] == {"checked": True, "ok": True, "mismatches": 0}
    assert results["memory"]["rss_start_mb"] > 0 and results["memory"]["peak_end_mb"] > 0
    assert results["versions"]["nnsight"] and results["machine"]["cpu_count"] >= 1


# -- capture-bench overhead: the outside ratio and its gate ------------------------------------


def overhead_pairs(*ratios, plain_ms=500.0, tokens=32):
    return [{"plain_ms": plain_ms, "plain_tokens": tokens, "capture_ms": plain_ms * r, "capture_tokens": tokens,
             "plain_cpu_ms": 400.0, "capture_cpu_ms": 400.0 * r} for r in ratios]


def test_overhead_pair_ratios_are_per_token():
    from capture_conformance.bench import overhead

    pairs = [{"plain_ms": 400.0, "plain_tokens": 32, "capture_ms": 210.0, "capture_tokens": 16}]
    assert overhead.pair_ratios(pairs) == [pytest.approx((210 / 16) / (400 / 32))]


def test_overhead_noise_is_the_medians_standard_error_from_the_mad():
    from capture_conformance.bench import overhead

    assert overhead.median_noise([1.0]) == 0.0
    assert overhead.median_noise([1.0, 1.0, 1.0, 1.0]) == 0.0
    values = [1.00, 1.02, 1.04, 1.06, 1.08, 1.10, 1.12, 3.00]  # one stalled request barely moves it
    mad = 0.04  # |v - 1.07|: 0.07 0.05 0.03 0.01 0.01 0.03 0.05 1.93 -> median 0.04
    assert overhead.median_noise(values) == pytest.approx(1.253 * 1.4826 * mad / 8 ** 0.5)


def test_overhead_gate_fails_only_beyond_target_plus_noise():
    from capture_conformance.bench import overhead

    assert overhead.gate(1.04, 0.0, 1.05) is True
    assert overhead.gate(1.06, 0.0, 1.05) is False
    assert overhead.gate(1.06, 0.02, 1.05) is True  # within the run's own noise
    assert overhead.gate(1.08, 0.02, 1.05) is False
    assert overhead.gate(9.0, 0.0, None) is None  # reported only
    steady_over = overhead.summarise_run(overhead_pairs(*[1.07] * 8), 1.05)
    assert steady_over["median"] == pytest.approx(1.07) and steady_over["noise"] == 0.0
    assert steady_over["passed"] is False and steady_over["cpu_ratio_median"] == pytest.approx(1.07)
    noisy = overhead.summarise_run(overhead_pairs(0.90, 0.95, 1.00, 1.05, 1.08, 1.12, 1.20, 1.30), 1.05)
    assert noisy["median"] == pytest.approx(1.065) and noisy["noise"] > 0.015 and noisy["passed"] is True
    runs = [{"lm_head": steady_over, "prompt": overhead.summarise_run(overhead_pairs(1.2), None)},
            {"lm_head": overhead.summarise_run(overhead_pairs(1.01, 1.02, 1.03), 1.05),
             "prompt": overhead.summarise_run(overhead_pairs(1.1), None)}]
    summary = overhead.summarise(runs)
    assert summary["lm_head"]["run_medians"] == [pytest.approx(1.07), pytest.approx(1.02)]
    assert summary["lm_head"]["passed"] is False  # one run failed its gate
    assert summary["prompt"]["passed"] is None and summary["prompt"]["median"] == pytest.approx(1.15)


def test_overhead_capture_bodies():
    from capture_conformance.bench import overhead

    selectors = _selectors()
    assert overhead.capture_for("lm_head", selectors)["savepoints"] == [{"name": "_logits", "selector": "logits"}]
    assert [sp["selector"] for sp in overhead.capture_for("layers", selectors)["savepoints"]] == [
        "gpt_neox_japanese.layers[0]", "gpt_neox_japanese.layers[1]", "gpt_neox_japanese.layers[2]"]
    assert overhead.capture_for("sequence", selectors)["positions"] == "sequence"
    with pytest.raises(ValueError):
        overhead.capture_for("nothing", selectors)


def run_overhead(tmp_path, *args, timeout=600):
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, "-m", "capture_conformance.bench", "overhead", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_overhead_tiny_real_run(tmp_path):
    """The command end to end, as small as it gets (its gate set out of reach: this checks the report, not speed)."""
    proc, results = run_overhead(tmp_path, "--pairs", "2", "--tokens", "2", "--warmup", "0",
                                 "--variants", "lm_head,sequence", "--target", "100", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [list(run) for run in results["runs"]] == [["lm_head", "sequence"]]
    lm_head = results["runs"][0]["lm_head"]
    assert len(lm_head["samples"]) == 2 and [s["order"] for s in lm_head["samples"]] == ["plain first", "capture first"]
    assert all(s["plain_tokens"] == 2 == s["capture_tokens"] for s in lm_head["samples"])
    assert 0 < lm_head["median"] < 100 and lm_head["passed"] is True
    assert results["runs"][0]["sequence"]["passed"] is None
    assert "| lm_head  | 1   |" in proc.stdout and "every run passed its gate" in proc.stdout
    assert results["versions"]["nnsight"] and results["machine"]["cpu_count"] >= 1
