"""Fleet conformance (issue 21): several --host in one run, a report per host, the parity table.

Three servers of the same embedded model: two reference servers and one serving a
slightly different checkpoint under the same name (``other_checkpoint`` of the fault
matrix: same config, shapes and tokenizer; weights off by 3% of their spread), the
way one host of a fleet ends up on another revision. Each host's own suites judge
it alone; the parity area replays the same greedy requests on all of them and must
name that host.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Three servers and two conformance runs: the matrix tier (tests/test_parity_judge.py covers the judgement in make test).
pytestmark = pytest.mark.matrix

from capture_conformance.harness.protocol.server import ManagedServer, free_port
from conftest import ServerProcess, inner_pytest_env

FAULTY_SERVER = Path(__file__).resolve().with_name("faulty_server.py")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    good = [ServerProcess(tmp_path_factory.mktemp(f"good{i}")) for i in range(2)]
    work = tmp_path_factory.mktemp("off")
    (work / "storage").mkdir()
    port = free_port()
    off = ManagedServer([sys.executable, str(FAULTY_SERVER), "--fault", "other_checkpoint", "--port", str(port),
                         "--storage-dir", str(work / "storage")], port, work, startup_timeout_s=180)
    off.start()
    try:
        for server in (*good, off):
            server.wait_ready()
        yield [server.base_url for server in good], off.base_url
    finally:
        for server in (*good, off):
            server.stop()


def _run(tmp_path: Path, hosts: list[str], *args: str, xdist: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
    report_dir = tmp_path / "report"
    argv = [sys.executable, "-m", "capture_conformance.harness.pytest_plugin.cli", "--report-dir", str(report_dir)]
    for url in hosts:
        argv += ["--host", url.removeprefix("http://")]  # HOST:PORT, as a user writes it
    env = inner_pytest_env()
    if xdist:  # the hosts spread over pytest-xdist's workers, as `-- -n 2` does for a user
        env["PYTEST_PLUGINS"] += ",xdist.plugin,xdist.looponfail"
    result = subprocess.run(argv + list(args), cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    path = report_dir / "conformance-report.json"
    assert path.is_file(), result.stdout[-3000:] + result.stderr[-2000:]
    return result, json.loads(path.read_text())


def test_a_fleet_of_two_correct_servers_passes_with_a_report_per_host_and_parity(fleet, tmp_path):
    good, _ = fleet
    result, report = _run(tmp_path, good, "--profile", "smoke", "--", "-n", "2", xdist=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert report["fleet"] and report["passed"], report
    assert [h["url"] for h in report["hosts"]] == good and all(h["passed"] for h in report["hosts"])
    for host in report["hosts"]:  # each host's own report, the single-host document, its own tests only
        own = json.loads((tmp_path / "report" / host["report"]).read_text())
        assert own["target"]["url"] == host["url"] and own["passed"] and own["tests"]
        assert all(t["host"] == host["url"] for t in own["tests"]), own["tests"][:2]
        assert {t["area"] for t in own["tests"]} >= {"health", "single_token", "multi_token"}
    table = report["parity"]["table"]
    assert table["ok"] and table["hosts"] == [*good, "reference (independent forward pass)"]
    assert len(report["parity"]["tests"]) == 2  # one verdict per host; the reference votes, it is not judged
    assert set(table["savepoints"]) == {"head", "block_first", "block_last", "block_mid_input"}
    assert {"short/prompt", "long/generated"} <= set(table["cases"]), table["cases"]
    assert all(v["deviation"] <= v["tolerance"] for v in table["verdicts"]), table["verdicts"]
    assert "parity" in result.stdout and "fleet: PASSED" in result.stdout
    assert (tmp_path / "report" / "conformance-report.html").read_text().count("<tr") >= 4


def test_parity_names_the_host_on_another_checkpoint(fleet, tmp_path):
    good, off = fleet
    result, report = _run(tmp_path, [*good, off], "--area", "parity")
    assert result.returncode == 1, result.stdout[-3000:]
    assert not report["passed"] and not report["parity"]["passed"]
    verdicts = {v["url"]: v for v in report["parity"]["table"]["verdicts"]}
    assert [url for url, v in verdicts.items() if not v["ok"]] == [off], verdicts
    assert verdicts[off]["why"].startswith(f"{off} disagrees with"), verdicts[off]
    failed = [t for t in report["parity"]["tests"] if t["outcome"] == "failed"]
    assert len(failed) == 1 and off.removeprefix("http://") in failed[0]["nodeid"], failed
    assert f"DISAGREES {off}" in result.stdout


def test_of_two_hosts_the_independent_reference_names_the_one_that_is_off(fleet, tmp_path):
    good, off = fleet
    result, report = _run(tmp_path, [good[0], off], "--area", "parity")
    assert result.returncode == 1, result.stdout[-3000:]
    verdicts = {v["url"]: v for v in report["parity"]["table"]["verdicts"]}
    assert [url for url, v in verdicts.items() if not v["ok"]] == [off], verdicts
    assert verdicts["reference (independent forward pass)"]["ok"] and verdicts[good[0]]["ok"]
    assert report["parity"]["table"]["note"] == ""
