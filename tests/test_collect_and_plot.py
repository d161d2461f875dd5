"""capture-collect and capture-plot against the bundled server."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ServerProcess
from capture_conformance.harness.tools.collect import extract_answer
from capture_conformance.harness.tools.plot import token_statistics

SAMPLE = "fixtures/gsm8k_sample.jsonl"


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7.\n#### 7", "7"),
    ("#### $1,200", "1200"),
    ("The answer is 12.50 dollars", "12.5"),
    ("first 3 then 45.", "45"),
    ("#### -4", "-4"),
    ("no digits here", None),
    ("#### 10.0 and later 99", "10"),
])
def test_gsm8k_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_token_statistics_match_torch():
    logits = np.random.default_rng(0).normal(size=(5, 50)).astype(np.float32) * 4
    top1, entropy = token_statistics(logits)
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=-1)
    np.testing.assert_allclose(top1, probs.max(-1).values.numpy(), rtol=1e-9)
    np.testing.assert_allclose(entropy, -(probs * probs.log()).sum(-1).numpy(), rtol=1e-9)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with ServerProcess(tmp_path_factory.mktemp("collect-server")) as proc:  # ready on entry, stopped on exit
        yield proc


def collect(server, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "capture_conformance.harness.tools.collect", "--input", SAMPLE, "--out", str(out), "--url", server.url,
         "--savepoints", "lm_head", "h0=model.layers[0]", "--max-tokens", "24", *extra],
        capture_output=True, text=True, timeout=600)


def test_collect_writes_manifest_and_files_and_resumes(server, tmp_path):
    out = tmp_path / "gsm"
    first = collect(server, out, "--limit", "3")
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["sample-000", "sample-001", "sample-002"]
    for record in records:
        n = record["usage"]["completion_tokens"]
        assert record["activations"]["lm_head"]["shape"] == [1, n, 151936]
        assert record["activations"]["h0"]["shape"] == [1, n, 256]
        assert (out / record["activations"]["h0"]["file"]).is_file()
        assert record["gold_answer"] == extract_answer(record["gold_answer"])
    refused = collect(server, out, "--limit", "5")
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = collect(server, out, "--limit", "5", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "3 done already, 2 to go" in resumed.stderr
    again = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in again] == [f"sample-{i:03d}" for i in range(5)]
    assert again[:3] == records  # done work is not redone
    from capture_conformance.harness.tools.manifest import verify_run

    assert verify_run(out) == []  # the resumed rows were collected under the same, unrewritten settings.json
    assert len({r["settings_sha256"] for r in again}) == 1
    correct = sum(r["correct"] for r in again)
    assert f"accuracy: {correct}/5 = {100 * correct / 5:.1f}%" in resumed.stdout


def test_collect_layers_are_found_in_the_model_and_out_of_range_is_refused(server, tmp_path):
    argv = [sys.executable, "-m", "capture_conformance.harness.tools.collect", "--input", SAMPLE, "--url", server.url,
            "--max-tokens", "8", "--limit", "1"]
    out = tmp_path / "layers"
    result = subprocess.run([*argv, "--out", str(out), "--savepoints", "_logits=logits", "--layers", "0", "-1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    settings = json.loads((out / "settings.json").read_text())
    # Qwen3 keeps its decoder blocks in model.layers (transformers' Qwen3Model); tiny-qwen3 has two.
    assert settings["layers"] == [0, -1]
    assert settings["selectors"] == ["_logits=logits", "layer_0=model.layers[0]", "layer_1=model.layers[1]"]
    record = json.loads((out / "manifest.jsonl").read_text())
    n = record["usage"]["completion_tokens"]
    assert {k: v["shape"] for k, v in record["activations"].items()} == {
        "_logits": [1, n, 151936], "layer_0": [1, n, 256], "layer_1": [1, n, 256]}
    wrong = subprocess.run([*argv, "--out", str(tmp_path / "wrong"), "--layers", "7"], capture_output=True,
                           text=True, timeout=600)
    assert wrong.returncode == 2 and "layer 7 is out of range: the model has 2 blocks" in wrong.stderr


def test_collect_can_record_server_paths_only(server, tmp_path):
    out = tmp_path / "paths"
    result = collect(server, out, "--limit", "1", "--no-download")
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "manifest.jsonl").read_text())
    assert "file" not in record["activations"]["lm_head"]
    assert record["activations"]["lm_head"]["server_path"].startswith(str(server.storage.resolve()))
    assert not (out / "files").exists()


def test_plot_writes_a_png_of_a_collected_problem_and_of_a_server_run(server, tmp_path):
    out = tmp_path / "gsm"
    assert collect(server, out, "--limit", "1", "--no-delete-remote").returncode == 0
    record = json.loads((out / "manifest.jsonl").read_text())
    for run_dir in (out / "files" / record["id"], server.storage / record["activation_run_id"]):
        png = tmp_path / f"{run_dir.name}.png"
        result = subprocess.run([sys.executable, "-m", "capture_conformance.harness.tools.plot", str(run_dir), "--out", str(png)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("tool", ["collect", "plot", "soak", "savepoints"])
def test_tool_help_is_plain_text_and_every_option_is_explained(tool):
    result = subprocess.run([sys.executable, "-m", f"capture_conformance.harness.tools.{tool}", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "``" not in result.stdout, result.stdout  # reST markup of the docstring
    # every option line of argparse's listing is followed by words (a help text), not the next option
    lines = result.stdout.splitlines()
    bare = [line.strip() for i, line in enumerate(lines)
            if line.startswith("  --") and len(line.split()) == len(line.split("  ")[1].split())
            and (i + 1 == len(lines) or lines[i + 1].lstrip().startswith("-") or not lines[i + 1].strip())]
    assert not bare, f"options without help: {bare}"
