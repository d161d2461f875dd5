"""The short soak, in CI: 8 client threads, a few hundred mixed requests, then the checks."""

from __future__ import annotations

import json

from conftest import ServerProcess
from capture_conformance.harness.tools.soak import run_soak

REQUESTS = 300


def test_soak(tmp_path, tiny_model_dir):
    server = ServerProcess(tmp_path)
    try:
        server.wait_ready()
        warmup = run_soak(server.url, total=40, threads=8, storage_dir=server.storage, pid=server.proc.pid, seed=1)
        assert warmup.server_errors == 0, server.log()
        result = run_soak(server.url, total=REQUESTS, threads=8, storage_dir=server.storage, pid=server.proc.pid, seed=2)
    finally:
        server.stop()
    summary = result.summary()
    (tmp_path / "soak.json").write_text(json.dumps(summary, indent=1))
    print("soak summary:", json.dumps(summary))
    assert result.server_errors == 0, summary["by_status"]
    assert result.contract_violations == [], result.contract_violations[:5]
    assert result.file_problems == [] and result.files_checked > 100
    assert summary["by_class"].get("4xx", 0) > 30 and summary["by_class"]["2xx"] > 200
    assert result.runs_on_disk == warmup.captures - warmup.deleted + result.captures - result.deleted
    # Flat memory: after a warm-up, a few hundred requests must not grow the server's RSS.
    growth = result.rss_mb_after - result.rss_mb_before
    assert growth < 0.15 * result.rss_mb_before, f"RSS grew {result.rss_mb_before} -> {result.rss_mb_after} MiB"
