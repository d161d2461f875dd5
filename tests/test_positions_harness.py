"""The positions suite against a server without prompt capture: reported as lacking it, never failed."""

from __future__ import annotations

import subprocess
import sys

from harness.plugin import SUITES_DIR
from test_harness_runs import LEGACY_LAUNCH, _env


def test_a_server_without_prompt_capture_is_reported_as_such(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                             str(SUITES_DIR / "test_positions.py"), "--launch", LEGACY_LAUNCH],
                            cwd=tmp_path, capture_output=True, text=True, timeout=240, env=_env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "7 skipped" in output, output
    assert "no prompt capture: asked with capture.positions='prompt', the answer's activations_meta has no " \
           "'positions'" in output, output
