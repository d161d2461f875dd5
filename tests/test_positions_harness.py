"""The positions suite against a server without prompt capture: reported as lacking it, never failed."""

from __future__ import annotations

import subprocess
import sys

from capture_conformance.harness.pytest_plugin.plugin import SUITES_DIR
from test_harness_runs import LEGACY_LAUNCH, _env


def test_a_server_without_prompt_capture_is_reported_as_such(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                             str(SUITES_DIR / "test_positions.py"), "--launch", LEGACY_LAUNCH],
                            cwd=tmp_path, capture_output=True, text=True, timeout=240, env=_env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "7 skipped" in output, output
    # The legacy server speaks the older store_activations dialect: no per-request capture object at all.
    assert "no prompt capture (capture.positions of protocol 1.1) (store_activations dialect)" in output, output


def test_a_server_whose_features_leave_out_prompt_is_reported_before_any_request(tmp_path):
    from legacy_server import ScriptedServer, healthy_routes

    asked = []
    routes = {
        **healthy_routes(),
        ("GET", "/v1/models"): lambda r: r.reply(200, {"object": "list", "data": [
            {"id": "tiny-qwen3", "object": "model", "capture": {"features": ["streaming"]}}]}),
        ("POST", "/v1/chat/completions"): lambda r: (asked.append(1), r.reply(500, {"detail": "not expected"}))[1],
    }
    with ScriptedServer(routes) as server:
        result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                                 str(SUITES_DIR / "test_positions.py"), "-k", "shapes or prompts_last",
                                 "--host", "127.0.0.1", "--port", str(server.port)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=240, env=_env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "3 skipped" in output, output
    assert "no prompt capture: /v1/models capture.features is ['streaming'], without 'prompt'" in output, output
    assert not asked, "a chat request was sent although the server said it has no prompt capture"
