"""Verified collections without a server: the plot's per-position statistics, the conformance verdict, resume checks.

The end-to-end checks (a collection's hashes and provenance, a changed byte named by verify and load_run,
collect -> export -> load -> the README probe) are in tests/test_collect_positions.py, on its collection.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from capture_conformance.harness.tools.collect import conformance_verdict, provenance_differences
from capture_conformance.harness.tools.plot import aligned_statistics, collection_statistics


def test_aligned_statistics_of_ragged_series_count_each_position():
    # three series aligned at their own starts: x = index - start
    series = [np.array([1.0, 2.0, 3.0]), np.array([5.0]), np.array([10.0, 20.0, 30.0, 40.0]), np.array([100.0])]
    stats = aligned_statistics(series, starts=[1, 0, 3, -3])
    # x:            -3    -2    -1     0     1     2     3
    # series 0:                 1     2     3
    # series 1:                       5
    # series 2:     10    20    30    40
    # series 3:                                         100
    assert stats.x.tolist() == [-3, -2, -1, 0, 1, 2, 3]
    assert stats.count.tolist() == [1, 1, 2, 3, 1, 0, 1]
    np.testing.assert_allclose(stats.mean[[0, 1, 2, 3, 4, 6]], [10.0, 20.0, 15.5, 47 / 3, 3.0, 100.0])
    assert np.isnan(stats.mean[5]) and np.isnan(stats.std[5])  # no series there: no value, not 0
    third = np.sqrt(((2 - 47 / 3) ** 2 + (5 - 47 / 3) ** 2 + (40 - 47 / 3) ** 2) / 3)
    np.testing.assert_allclose(stats.std[[0, 1, 2, 3, 4, 6]], [0.0, 0.0, 14.5, third, 0.0, 0.0])


def test_collection_statistics_align_prompt_ends_and_completion_starts():
    def vectors(*norms):  # [T, 2] rows whose L2 norms are the given numbers (3-4-5 scaled)
        return np.array([[0.6 * n, 0.8 * n] for n in norms], dtype=np.float32)

    sequence = types.SimpleNamespace(
        settings={"positions": "sequence"},
        rows=[{"positions": "sequence", "prompt_token_ids": [7, 7]},          # P=2, N=1
              {"positions": "sequence", "prompt_token_ids": [7, 7, 7]}],      # P=3, N=2
        arrays={"h": [vectors(1, 2, 3), vectors(10, 20, 30, 40, 50)]})
    stats = collection_statistics(sequence, "h")
    assert stats.x.tolist() == [-3, -2, -1, 0, 1]  # prompt negative, the first completion token at 0
    assert stats.count.tolist() == [1, 2, 2, 2, 1]
    np.testing.assert_allclose(stats.mean, [10, 10.5, 16, 21.5, 50], rtol=1e-6)

    prompt = types.SimpleNamespace(settings={"positions": "prompt"}, rows=[{"positions": "prompt"}] * 2,
                                   arrays={"h": [vectors(1, 2), vectors(5, 6, 7)]})
    stats = collection_statistics(prompt, "h")
    assert stats.x.tolist() == [-3, -2, -1]  # the prompts' last tokens together at -1
    assert stats.count.tolist() == [1, 2, 2]
    np.testing.assert_allclose(stats.mean, [5, 3.5, 4.5], rtol=1e-6)


REPORT = {"tool": "capture-conformance", "passed": False, "capture_level": "core", "model": "tiny-qwen3",
          "profile": "core", "target": {"url": "http://h:1"},
          "tests": [{"outcome": "passed"}, {"outcome": "failed"}, {"outcome": "failed"}, {"outcome": "skipped"}]}


def test_the_conformance_verdict_is_read_from_a_report_or_its_directory(tmp_path):
    (tmp_path / "conformance-report.json").write_text(json.dumps(REPORT))
    verdict = conformance_verdict(tmp_path, "tiny-qwen3")
    assert verdict["passed"] is False and verdict["capture_level"] == "core"
    assert verdict["counts"] == {"failed": 2, "passed": 1, "skipped": 1} and verdict["url"] == "http://h:1"
    with pytest.raises(ValueError, match="judged model 'tiny-qwen3', this run collects 'tiny-gpt2'"):
        conformance_verdict(tmp_path / "conformance-report.json", "tiny-gpt2")
    (tmp_path / "other.json").write_text(json.dumps({"passed": True}))
    with pytest.raises(ValueError, match="not a capture-conformance report"):
        conformance_verdict(tmp_path / "other.json", "tiny-qwen3")


def test_a_bad_conformance_report_stops_the_run_before_any_request(tmp_path):
    (tmp_path / "r.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "capture_conformance.harness.tools.collect", "--input",
                             "fixtures/gsm8k_sample.jsonl", "--out", str(tmp_path / "out"), "--host", "127.0.0.1",
                             "--port", "9", "--conformance-report", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--conformance-report" in result.stderr and "cannot read it" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_resume_may_change_the_server_but_not_the_model_weights():
    model = {"id": "m", "revision": "unknown", "dtype": "float32", "weights": {"sha256": {"w.safetensors": "aa"}}}
    recorded = {"model": model, "servers": [{"url": "http://a:1"}]}
    moved = {"model": dict(model), "servers": [{"url": "http://b:2"}]}
    assert provenance_differences(recorded, moved) == []
    retrained = {"model": {**model, "weights": {"sha256": {"w.safetensors": "bb"}}}}
    assert provenance_differences(recorded, retrained) == ["model weights: their sha256 differs from the run's"]
    half = {"model": {**model, "dtype": "bfloat16"}}
    assert provenance_differences(recorded, half) == ["model dtype: 'float32' in the run, 'bfloat16' now"]


@pytest.mark.parametrize("sub", ["verify", "export"])
def test_the_subcommands_help_is_plain(sub):
    result = subprocess.run([sys.executable, "-m", "capture_conformance.harness.tools.collect", sub, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: capture-collect {sub}"), result.stderr
    assert "``" not in result.stdout


def test_verify_of_a_directory_that_is_no_run_says_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "capture_conformance.harness.tools.collect", "verify",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a capture-collect output directory" in result.stderr
