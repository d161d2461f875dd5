"""The reference server as a subprocess on a free port, and the HTTP calls the bench makes."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_proc_status_mb(pid: int, field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` (peak resident) of a process from /proc, in MiB (Linux only)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class ServerHandle:
    """A server to send requests to: started here (``start``) or already running (``attach``)."""

    def __init__(self, url: str, proc: subprocess.Popen | None = None, log_path: Path | None = None,
                 pid: int | None = None, command: list[str] | None = None, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.proc = proc
        self.pid = proc.pid if proc is not None else pid
        self.log_path = log_path
        self.command = command
        self._log_file = None
        self._local = threading.local()
        self.model_id: str | None = None
        self.capture_info: dict = {}

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def start(cls, model: str, device: str, dtype: str, storage_dir: Path, log_path: Path,
              extra_args: list[str] = (), api_key: str | None = None, threads: int | None = None) -> "ServerHandle":
        port = free_port()
        command = [sys.executable, "-m", "reference_server", "--port", str(port), "--storage-dir", str(storage_dir),
                   "--model", model, "--device", device, "--dtype", dtype, "--log-level", "warning", *extra_args]
        # The server reads its key from the environment too: set it, or clear a stray one.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CAPTURE_SERVER_API_KEY": api_key or ""}
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        if (PROJECT_ROOT / "reference_server").is_dir():  # run from a checkout without an install
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        log_file = open(log_path, "w")
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        handle = cls(f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, command=command, api_key=api_key)
        handle._log_file = log_file
        return handle

    @classmethod
    def attach(cls, url: str, pid: int | None = None, api_key: str | None = None) -> "ServerHandle":
        return cls(url, pid=pid, api_key=api_key)

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    health = r.json()
                    self.model_id = health["loaded_models"][0]
                    models = requests.get(self.url + "/v1/models", headers=self.headers, timeout=30).json()["data"]
                    entry = next((m for m in models if m["id"] == self.model_id), models[0])
                    self.capture_info = entry.get("capture", {})
                    return health
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    # -- memory ------------------------------------------------------------------------

    def rss_mb(self) -> float | None:
        if self.pid is None:
            return None
        try:
            import psutil

            return psutil.Process(self.pid).memory_info().rss / 2**20
        except Exception:  # psutil missing or the process gone
            return read_proc_status_mb(self.pid, "VmRSS")

    def cpu_s(self) -> float | None:
        """CPU seconds the server process has used (all its threads), or None when unknown."""
        if self.pid is None:
            return None
        try:
            import psutil

            t = psutil.Process(self.pid).cpu_times()
            return t.user + t.system
        except Exception:
            return None

    def peak_mb(self) -> float | None:
        return None if self.pid is None else read_proc_status_mb(self.pid, "VmHWM")

    # -- requests ----------------------------------------------------------------------

    @property
    def session(self) -> requests.Session:
        """One keep-alive session per thread (a Session is not shared across threads)."""
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.headers.update(self.headers)
        return s

    def chat(self, body: dict, timeout: float) -> tuple[float, dict]:
        """POST one chat request; ``(milliseconds, response body)``. Raises on a non-200."""
        start = time.perf_counter()
        r = self.session.post(self.url + "/v1/chat/completions", json=body, timeout=timeout)
        data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"raw": r.text[:500]}
        ms = (time.perf_counter() - start) * 1e3
        if r.status_code != 200:
            raise RuntimeError(f"chat request answered {r.status_code}: {str(data)[:500]}")
        return ms, data

    def delete(self, run_id: str | None) -> None:
        if run_id:
            r = self.session.delete(f"{self.url}/v1/activations/{run_id}", timeout=60)
            if r.status_code not in (204, 404):
                raise RuntimeError(f"DELETE run {run_id} answered {r.status_code}")

    def fetch(self, run_id: str, name: str, fmt: str):
        """Download one stored tensor and load it."""
        import torch

        r = self.session.get(f"{self.url}/v1/activations/{run_id}/{name}", timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"GET {name} of run {run_id} answered {r.status_code}")
        if fmt == "safetensors":
            from safetensors.torch import load

            return load(r.content)[name]
        return torch.load(io.BytesIO(r.content), weights_only=True)


def chat_body(model_id: str, prompt: str, tokens: int, capture: dict | None = None) -> dict:
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    if capture is not None:
        body["capture"] = capture
    return body


LOGITS = {"name": "_logits", "selector": "lm_head"}


def capture_for(variant: str, num_layers: int) -> dict | None:
    """The ``capture`` object of a server variant (None: no capture)."""
    if variant == "server-none":
        return None
    if variant == "server-logits-pt":
        return {"savepoints": [LOGITS], "format": "pt"}
    if variant == "server-logits-safetensors":
        return {"savepoints": [LOGITS], "format": "safetensors"}
    if variant == "server-logits-layers":
        layers = [{"name": f"layer{i}", "selector": f"model.layers[{i}]"} for i in range(num_layers)]
        return {"savepoints": [LOGITS, *layers], "format": "pt"}
    if variant == "server-logits-last":
        return {"savepoints": [LOGITS], "tokens": "last", "format": "pt"}
    if variant == "server-prompt-logits":
        return {"savepoints": [LOGITS], "positions": "prompt", "format": "pt"}
    if variant == "server-sequence-logits":
        return {"savepoints": [LOGITS], "positions": "sequence", "format": "pt"}
    raise ValueError(f"not a server variant: {variant!r}")
