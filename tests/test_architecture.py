"""The layer rules of pyproject.toml's [tool.importlinter], checked by import-linter on the installed packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_the_layer_contracts_hold():
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("name", ["harness", "reference_server", "suites", "fixtures", "bench"])
def test_the_project_imports_under_one_namespace_only(name):
    """No generic top-level module: `fixtures` (say) would shadow another distribution of that name."""
    probe = subprocess.run([sys.executable, "-c", f"import {name}"], cwd="/", capture_output=True, text=True,
                           timeout=60)
    assert f"No module named '{name}'" in probe.stderr, f"`import {name}` works outside the repository"
