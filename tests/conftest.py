"""Fixtures for the project's own tests: the tiny model, an in-process app, a real server process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# No model hub is reachable here: without this, loading an unknown id retries the hub for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID, ensure_tiny_model
from capture_conformance.harness.protocol.client import chat_body as library_chat_body
from capture_conformance.harness.protocol.server import ManagedServer, free_port

MATRIX_MARKER = ("matrix: a whole conformance run per case (the fault matrix, the zoo's families); "
                 "`make matrix` runs them, `make test` the rest, CI both")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MATRIX_MARKER)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def registry(tiny_model_dir):
    """One loaded tiny model for every in-process app of the session (loading costs a second)."""
    from capture_conformance.reference_server.registry import ModelRegistry

    reg = ModelRegistry(device="cpu")
    reg.load(TINY_MODEL_ID)
    yield reg
    reg.shutdown()


@pytest.fixture(scope="session")
def hf_reference(tiny_model_dir):
    """The same checkpoint through plain transformers: the ground truth for values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def make_client(registry, storage_dir: Path, **settings):
    from fastapi.testclient import TestClient

    from capture_conformance.reference_server.app import create_app
    from capture_conformance.reference_server.settings import Settings

    app = create_app(Settings(storage_dir=storage_dir, **settings), registry=registry)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(registry, tmp_path):
    with make_client(registry, tmp_path / "storage") as c:
        assert c.app.state.readiness.ready.wait(30), "in-process app never became ready"
        yield c


class ServerProcess(ManagedServer):
    """A real ``capture-server`` (``python -m capture_conformance.reference_server``) on a free port, through the one launcher."""

    def __init__(self, tmp: Path, *extra: str, startup_timeout_s: float = 120):
        port = free_port()
        argv = [sys.executable, "-m", "capture_conformance.reference_server", "--port", str(port), "--storage-dir", str(tmp / "storage"),
                *extra]
        super().__init__(argv, port, tmp, startup_timeout_s=startup_timeout_s)
        self.start()

    url = ManagedServer.base_url
    storage = ManagedServer.storage_dir

    @property
    def proc(self):
        return self.process

    def log(self) -> str:
        return self.log_text()

    def wait_ready(self, timeout: float | None = None) -> list[int | None]:
        """Poll /health until ready; return the statuses seen. Fails at once if the process dies."""
        if timeout is not None:
            self.startup_timeout_s = timeout
        super().wait_ready()
        return self.statuses


@pytest.fixture(scope="module")
def server_process(tmp_path_factory, tiny_model_dir):
    with ServerProcess(tmp_path_factory.mktemp("server")) as server:  # ready on entry, stopped on exit
        yield server


# The pytest11 plugins a conformance run needs; the dev environment autoloads more (schemathesis,
# hypothesis, anyio, xdist, timeout), which costs ~2 s of CPU per inner pytest run.
CONFORMANCE_PLUGINS = "capture_conformance.harness.pytest_plugin.plugin,syrupy"


def inner_pytest_env(*, lean: bool = True, ci: bool | None = None) -> dict[str, str]:
    """The environment of a pytest run these tests start: none of the outer run's identity.

    An outer xdist worker's variables would leak into the inner run (syrupy reads them);
    ``lean`` loads only the conformance plugins (not for tests of plugin autoloading itself);
    ``ci`` sets or clears CI (our CI sets CI=true, which decides whether snapshots are recorded).
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    if lean:
        env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTEST_PLUGINS=CONFORMANCE_PLUGINS)
    if ci is not None:
        env.pop("CI", None)
        if ci:
            env["CI"] = "true"
    return env


def stored_run_ids(store) -> list[str]:
    """The run directories a store holds on disk (the staging area aside), sorted."""
    return sorted(p.name for p in store.root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


def chat_body(content: str = "Tell me a short story about a fox.", max_tokens: int = 5, *,
              model: str = TINY_MODEL_ID, **extra) -> dict:
    """The library's chat body with the server tests' defaults: the tiny model, greedy, a story prompt."""
    return library_chat_body(model, content, max_tokens, **extra)
