"""Issue 18: the reference server serving each family of the zoo passes the conformance run, values verified,
and ``capture-collect --layers`` works with the selectors discovered in that model.

One server per family (``capture-server --model tiny-<family>``), then ``capture-conformance --host ...``
against it, held to every optional feature as the bundled server always is, then ``capture-collect``
against the same server. GPT-2 (the family of the issue) runs the full profile, the others core; the
default model, tiny-qwen3, is the suites' own run in ``make test``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from capture_conformance.fixtures.zoo import ZOO_IDS, ensure_builtin
from capture_conformance.harness.pytest_plugin.areas import AREAS, FEATURES, FLEET_AREA
from conftest import ServerProcess, inner_pytest_env

FULL_PROFILE = "tiny-gpt2"
SAMPLE = Path(__file__).resolve().parent.parent / "fixtures" / "gsm8k_sample.jsonl"


def _conformance(server: ServerProcess, family: str, workdir: Path) -> tuple[subprocess.CompletedProcess, dict]:
    report_dir = workdir / "report"
    required = [arg for feature in FEATURES for arg in ("--require-feature", feature)]
    argv = [sys.executable, "-m", "capture_conformance.harness.pytest_plugin.cli", "--host", server.url,
            "--model", family, "--profile", "full" if family == FULL_PROFILE else "core",
            "--report-dir", str(report_dir), *required]
    result = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=900, env=inner_pytest_env())
    path = report_dir / "conformance-report.json"
    assert path.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(path.read_text())


@pytest.mark.matrix
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("family", ZOO_IDS)
def test_the_reference_server_serving_each_family_conforms_and_collects_with_discovered_layers(family, tmp_path):
    model_dir = ensure_builtin(family)
    with ServerProcess(tmp_path, "--model", family) as server:
        server.wait_ready()
        result, report = _conformance(server, family, tmp_path)
        failed = [f"{t['nodeid']}: {(t.get('message') or '')[:300]}" for t in report["tests"]
                  if t["outcome"] in ("failed", "error")]
        assert result.returncode == 0 and report["passed"], "\n".join(failed) + result.stdout[-2000:]
        assert report["capture_level"] == "full" and report["diagnoses"] == [], report["diagnoses"]
        ran = {t["area"] for t in report["tests"] if t["outcome"] == "passed"}
        single_host = {a.name for a in AREAS} - {FLEET_AREA}  # parity needs a fleet (tests/test_fleet.py)
        assert ran == single_host, f"areas that passed no test: {sorted(single_host - ran)}"
        assert str(report["values"]["status"]).startswith("verified"), report["values"]
        truth, layout = report["ground_truth"], report["layout"]
        assert truth["independent"] and truth["from_server"] == [], truth
        assert layout["independent"] and layout["num_blocks"] == truth["num_layers"], layout
        config = json.loads((model_dir / "config.json").read_text())
        assert truth["vocab_size"] == config["vocab_size"], (truth, config["vocab_size"])

        out = tmp_path / "collected"
        collect = subprocess.run(
            [sys.executable, "-m", "capture_conformance.harness.tools.collect", "--input", str(SAMPLE), "--out",
             str(out), "--url", server.url, "--model", family, "--savepoints", "_logits=logits", "--layers", "0", "-1",
             "--limit", "2",
             "--max-tokens", "12"], capture_output=True, text=True, timeout=600)
        assert collect.returncode == 0, collect.stderr[-2000:]
        selectors = json.loads((out / "settings.json").read_text())["selectors"]
        last = layout["num_blocks"] - 1
        blocks = layout["blocks"]
        assert selectors == ["_logits=logits", f"layer_0={blocks}[0]", f"layer_{last}={blocks}[{last}]"], selectors
        for line in (out / "manifest.jsonl").read_text().splitlines():
            record = json.loads(line)
            n = record["usage"]["completion_tokens"]
            shapes = {name: entry["shape"] for name, entry in record["activations"].items()}
            assert shapes == {"_logits": [1, n, truth["vocab_size"]], "layer_0": [1, n, truth["hidden_size"]],
                              f"layer_{last}": [1, n, truth["hidden_size"]]}, shapes
            assert all((out / entry["file"]).is_file() for entry in record["activations"].values())
