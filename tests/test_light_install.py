"""The light harness install runs the suites against a host, in a clean virtual environment without nnsight.

A fresh ``python -m venv`` (no system site-packages) gets this project without
extras (pytest, requests, syrupy, safetensors, numpy and their own
dependencies; pip may fetch them from the package index). The reference server
runs from this environment; the light environment runs ``pytest --host … --port …``
from an unrelated directory, so the installed ``suites`` package is what runs.
The venv is built once per test session (a file lock shares it between
pytest-xdist workers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ServerProcess

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "nnsight", "transformers")
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     "reports", "capture-storage", "conformance-report", ".cache", ".whl")


def _clean_env(**extra: str) -> dict:
    """No trace of this environment: no PYTHONPATH, no venv, no outer pytest/xdist state."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_PLUGINS")
           and not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS"))}
    return {**env, **extra}


def _build_light_venv(root: Path) -> dict:
    venv = root / "venv"
    python = venv / "bin" / "python"
    timings = {}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True,
                   timeout=120, env=_clean_env())
    timings["venv_s"] = round(time.monotonic() - started, 1)
    # Install from a copy: building in the repository would leave build/ and *.egg-info behind.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=COPY_IGNORE)
    started = time.monotonic()
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-input", "-q", str(source)],
                             capture_output=True, text=True, timeout=600, env=_clean_env())
    timings["pip_install_s"] = round(time.monotonic() - started, 1)
    if install.returncode != 0:
        raise RuntimeError(f"pip install of the light harness failed ({install.returncode}):\n"
                           f"{install.stdout[-3000:]}\n{install.stderr[-3000:]}")
    shutil.rmtree(source, ignore_errors=True)
    return {"python": str(python), "timings": timings}


@pytest.fixture(scope="session")
def light_venv(tmp_path_factory) -> dict:
    """{"python": path, "timings": {...}}; built once per session, shared between xdist workers."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's base directory, common to all workers
    root = shared / "light-install"
    marker = root / "ready.json"
    try:
        from filelock import FileLock
    except ImportError:  # filelock comes with the server extra; without it every worker builds its own
        FileLock = None
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / ".lock")) if FileLock else None
    if lock:
        lock.acquire(timeout=900)
    try:
        if marker.is_file():
            return json.loads(marker.read_text())
        if (root / "venv").exists():  # a previous, interrupted build
            shutil.rmtree(root / "venv")
        info = _build_light_venv(root)
        marker.write_text(json.dumps(info))
        return info
    finally:
        if lock:
            lock.release()


@pytest.fixture(scope="module")
def reference_server(tmp_path_factory):
    """The bundled server, started from this (full) environment through the project's one launcher."""
    with ServerProcess(tmp_path_factory.mktemp("light-server"), startup_timeout_s=180) as server:
        yield {"port": server.port, "url": server.url, "log": server.log_path}

GENERIC_NAMES = ("fixtures", "harness", "suites", "bench", "reference_server")


def test_the_light_install_has_no_torch_nnsight_or_transformers(light_venv):
    for module in HEAVY:
        probe = subprocess.run([light_venv["python"], "-c", f"import {module}"], capture_output=True, text=True,
                               timeout=60, env=_clean_env(), cwd="/")
        assert probe.returncode != 0, f"`import {module}` works in the light venv"
        assert f"No module named '{module}'" in probe.stderr, probe.stderr
    # The project's own packages live under one namespace: nothing generic at the top level
    # (`fixtures` is a well-known distribution of its own; two owners of one name break one of them).
    for module in GENERIC_NAMES:
        probe = subprocess.run([light_venv["python"], "-c", f"import {module}"], capture_output=True, text=True,
                               timeout=60, env=_clean_env(), cwd="/")
        assert f"No module named '{module}'" in probe.stderr, f"the install added a top-level {module!r}"
    # ... but the harness itself imports, with its pytest plugin registered
    probe = subprocess.run([light_venv["python"], "-c",
                            "import capture_conformance.harness.pytest_plugin.plugin, capture_conformance.harness.protocol.tensors, capture_conformance.harness.protocol.client, capture_conformance.harness.pytest_plugin.report, "
                            "capture_conformance.harness.pytest_plugin.html_report, capture_conformance.suites, sys; "
                            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,)],
                           capture_output=True, text=True, timeout=60, env=_clean_env(), cwd="/")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]", probe.stdout


def test_the_light_install_runs_the_suites_against_a_host(light_venv, reference_server, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # no conftest, no pyproject, no repository: the installed suites run
    elsewhere.mkdir()
    report_dir = tmp_path / "report"
    started = time.monotonic()
    result = subprocess.run(
        [light_venv["python"], "-m", "pytest", "--host", "127.0.0.1", "--port", str(reference_server["port"]),
         "-p", "no:cacheprovider", "-q", "-rs", "--conformance-report", str(report_dir)],
        cwd=elsewhere, capture_output=True, text=True, timeout=280, env=_clean_env(HF_HUB_OFFLINE="1"))
    elapsed = round(time.monotonic() - started, 1)
    output = result.stdout + result.stderr
    print(f"light install: {light_venv['timings']}, suites run {elapsed} s")
    assert result.returncode == 0, output[-6000:]
    report = json.loads((report_dir / "conformance-report.json").read_text())
    # Without torch the values cannot be verified: the level says so, the run does not pretend or crash.
    assert report["passed"] is True and report["capture_level"] == "full (shapes only)", {k: report[k] for k in (
        "passed", "capture_level", "areas")}
    assert report["values"]["status"].startswith("values not verifiable: torch is not installed (light install; "
                                                 "pip install 'capture-conformance[values]'"), report["values"]
    assert report["values"]["reference"]["available"] is False, report["values"]
    assert report["target"]["started_by_harness"] is False
    assert report["model"] == "tiny-qwen3"
    # config.json is read as plain JSON: the sizes come from the model, not from the server under test
    assert report["ground_truth"]["independent"] is True, report["ground_truth"]
    assert report["ground_truth"]["source"].startswith("model config"), report["ground_truth"]
    assert (report_dir / "conformance-report.html").is_file()

    # What the docs say happens without transformers: the tokenizer checks and the value comparisons are
    # skipped with the reason, shown in the table, never claimed as passed; and, the savepoints being read
    # off the server's list (no module tree without torch), the one comparison of the alias `logits` with
    # the head's module, which that list cannot name. Nothing else is skipped.
    tests = report["tests"]
    skipped = [t for t in tests if t["outcome"] == "skipped"]
    assert {t["area"] for t in skipped} == {"chat", "values", "savepoints"}, skipped
    assert report["layout"]["independent"] is False and report["layout"]["blocks"] == "model.layers", report["layout"]
    for test in skipped:
        if test["area"] == "savepoints":
            assert test["nodeid"].endswith("test_logits_alias_equals_the_head_module"), test
            assert "which module is the head is not known" in test["message"], test
        elif test["area"] == "chat":
            assert "not verifiable without the model's tokenizer" in test["message"], test
            assert "transformers is not installed (light install)" in test["message"], test
        else:
            assert test["message"].startswith("values not verifiable: torch is not installed"), test
    # what needs no reference still runs: capture does not change generation
    values_passed = [t for t in tests if t["area"] == "values" and t["outcome"] == "passed"]
    assert [t["nodeid"].split("::")[-1] for t in values_passed] == ["test_capture_does_not_change_generation"]
    assert "values     " in result.stdout and "values not verifiable" in result.stdout, result.stdout[-3000:]
    assert not [t for t in tests if t["outcome"] in ("failed", "error")]
    assert sum(t["outcome"] == "passed" for t in tests) > 90, len(tests)
    # -rs shows the reason, and where the skipped test lives: the light venv's installed suites
    assert "transformers is not installed (light install)" in result.stdout, result.stdout[-3000:]
    assert "site-packages/capture_conformance/suites/test_chat.py" in result.stdout, result.stdout[-3000:]
