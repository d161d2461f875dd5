"""Fixtures for the project's own tests: the tiny model, an in-process app, a real server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

# No model hub is reachable here: without this, loading an unknown id retries the hub for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures.tiny_model import TINY_MODEL_ID, ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def registry(tiny_model_dir):
    """One loaded tiny model for every in-process app of the session (loading costs a second)."""
    from reference_server.registry import ModelRegistry

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

    from reference_server.app import create_app
    from reference_server.settings import Settings

    app = create_app(Settings(storage_dir=storage_dir, **settings), registry=registry)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(registry, tmp_path):
    with make_client(registry, tmp_path / "storage") as c:
        assert c.app.state.readiness.ready.wait(30), "in-process app never became ready"
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `capture-server` on a free port; its log is shown when a test fails."""

    def __init__(self, tmp: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.storage = tmp / "storage"
        self.log_path = tmp / "server.log"
        self._log = self.log_path.open("w")
        exe = Path(sys.executable).with_name("capture-server")
        self.proc = subprocess.Popen(
            [str(exe), "--port", str(self.port), "--storage-dir", str(self.storage), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait_ready(self, timeout: float = 120) -> list[int]:
        """Poll /health until 200; return the statuses seen. Fails at once if the process dies."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = requests.get(self.url + "/health", timeout=2).status_code
                seen.append(status)
                if status == 200:
                    return seen
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="module")
def server_process(tmp_path_factory, tiny_model_dir):
    server = ServerProcess(tmp_path_factory.mktemp("server"))
    try:
        server.statuses = server.wait_ready()
        yield server
    finally:
        server.stop()


def chat_body(content: str = "Tell me a short story about a fox.", max_tokens: int = 5, **extra) -> dict:
    return {
        "model": TINY_MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
