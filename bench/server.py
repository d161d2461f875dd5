"""The reference server as a subprocess on a free port, and the HTTP calls the bench makes."""

from __future__ import annotations

import io
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from capture_conformance.harness.protocol.server import ManagedServer, free_port



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

    def __init__(self, url: str, launched: ManagedServer | None = None, pid: int | None = None,
                 api_key: str | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.launched = launched  # the process, when this bench started it
        self.pid = launched.process.pid if launched is not None and launched.process else pid
        self._local = threading.local()
        self.model_id: str | None = None
        self.capture_info: dict = {}
        self.selectors: Selectors | None = None  # known once ready

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def start(cls, model: str, device: str, dtype: str, storage_dir: Path, log_path: Path,
              extra_args: list[str] = (), api_key: str | None = None, threads: int | None = None) -> "ServerHandle":
        port = free_port()
        command = [sys.executable, "-m", "capture_conformance.reference_server", "--port", str(port), "--storage-dir", str(storage_dir),
                   "--model", model, "--device", device, "--dtype", dtype, "--log-level", "warning", *extra_args]
        # The server reads its key from the environment too: set it, or clear a stray one.
        env = {"CAPTURE_SERVER_API_KEY": api_key or ""}
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        launched = ManagedServer(command, port, log_path.parent, env=env, log_file=log_path)
        launched.start()
        return cls(launched.base_url, launched=launched, api_key=api_key)

    @classmethod
    def attach(cls, url: str, pid: int | None = None, api_key: str | None = None) -> "ServerHandle":
        return cls(url, pid=pid, api_key=api_key)

    @property
    def proc(self):
        return self.launched.process if self.launched else None

    @property
    def command(self) -> list[str] | None:
        return self.launched.argv if self.launched else None

    def log_tail(self, chars: int = 3000) -> str:
        return self.launched.log_text(chars) if self.launched else ""

    def wait_ready(self, timeout: float) -> dict:
        """Ready by the launcher's real /health requests (or one answer, for an attached server); then the model's facts."""
        if self.launched is not None:
            self.launched.startup_timeout_s = timeout
            self.launched.wait_ready()
            health = self.launched.startup_trace[-1].body
        else:
            r = requests.get(self.url + "/health", timeout=min(timeout, 30))
            if r.status_code != 200:
                raise RuntimeError(f"{self.url}/health answered {r.status_code}: {r.text[:300]}")
            health = r.json()
        self.model_id = health["loaded_models"][0]
        models = requests.get(self.url + "/v1/models", headers=self.headers, timeout=30).json()["data"]
        entry = next((m for m in models if m["id"] == self.model_id), models[0])
        self.capture_info = entry.get("capture", {})
        from capture_conformance.harness.protocol.client import CaptureClient
        from capture_conformance.harness.tools.savepoints import model_layout

        # The model's local copy where there is one, else the server's own list of savepoints.
        client = CaptureClient(self.url, api_key=self.api_key, timeout_s=30)
        self.selectors = Selectors.of(model_layout(self.model_id, client))
        return health

    def stop(self) -> None:
        if self.launched is not None:
            self.launched.stop()

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


@dataclass(frozen=True)
class Selectors:
    """What the bench captures, by role, in the served model's own names: its head and every block."""

    head: str
    blocks: tuple[str, ...]

    @classmethod
    def of(cls, layout) -> "Selectors":
        """From the harness's discovered layout (``harness.tools.savepoints.model_layout``): no module name assumed."""
        return cls(layout.head, tuple(layout.block(i) for i in range(layout.num_blocks)))

    def logits(self) -> dict:
        return {"name": "_logits", "selector": self.head}

    def layers(self) -> list[dict]:
        return [{"name": f"layer{i}", "selector": block} for i, block in enumerate(self.blocks)]


def capture_for(variant: str, selectors: Selectors) -> dict | None:
    """The ``capture`` object of a server variant (None: no capture)."""
    logits = selectors.logits()
    if variant == "server-none":
        return None
    if variant == "server-logits-pt":
        return {"savepoints": [logits], "format": "pt"}
    if variant == "server-logits-safetensors":
        return {"savepoints": [logits], "format": "safetensors"}
    if variant == "server-logits-layers":
        return {"savepoints": [logits, *selectors.layers()], "format": "pt"}
    if variant == "server-logits-last":
        return {"savepoints": [logits], "tokens": "last", "format": "pt"}
    if variant == "server-prompt-logits":
        return {"savepoints": [logits], "positions": "prompt", "format": "pt"}
    if variant == "server-sequence-logits":
        return {"savepoints": [logits], "positions": "sequence", "format": "pt"}
    raise ValueError(f"not a server variant: {variant!r}")
