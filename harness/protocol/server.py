"""Starting, watching and stopping a capture server process (the bundled one or ``--launch``).

Like vLLM's ``RemoteOpenAIServer`` in its tests: a free port, the process in its
own session with its output in a log file, readiness decided by real ``/health``
requests (200 with the protocol's body and the expected model listed), an
immediate failure with the log tail when the process dies, and terminate-then-
kill at the end. Every ``/health`` answer seen while waiting is kept in
``startup_trace`` so the health suite can check the 503-then-200 contract.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from capture_conformance.harness.protocol.dialects import detect, loaded_models, looks_like_capture_health

POLL_INTERVAL_S = 0.05
LOG_TAIL_LINES = 40


class ServerStartError(RuntimeError):
    """The server did not become ready; the message carries its log tail."""


@dataclass
class HealthProbe:
    """One readiness poll: seconds since start, HTTP status (None: no connection) and body."""

    at_s: float
    status: int | None
    body: object = None

    def brief(self) -> str:
        if self.status is None:
            return f"{self.at_s:.2f}s no connection"
        return f"{self.at_s:.2f}s {self.status} {json.dumps(self.body)[:120] if self.body is not None else ''}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def bundled_command(port: int, model: str, storage_dir: str, api_key: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "capture_conformance.reference_server", "--host", "127.0.0.1", "--port", str(port),
               "--model", model, "--storage-dir", storage_dir]
    if api_key:
        command += ["--api-key", api_key]
    return command


def launch_command(template: str, port: int, storage_dir: str) -> list[str]:
    """The ``--launch`` command with ``{port}``, ``{storage_dir}``, ``{python}`` filled in.

    A leading ``python``/``python3`` means this interpreter, so the launched server
    sees the same installation as the harness even when ``.venv/bin`` is not on PATH.
    """
    filled = template.replace("{port}", str(port)).replace("{storage_dir}", shlex.quote(storage_dir))
    filled = filled.replace("{python}", shlex.quote(sys.executable))
    argv = shlex.split(filled)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def log_tail(path: str | os.PathLike | None, lines: int = LOG_TAIL_LINES) -> str:
    if not path or not Path(path).is_file():
        return "<no server log>"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or "<server log is empty>"


@dataclass
class ManagedServer:
    """A server process this run owns: the one launcher of the project.

    The plugin starts the bundled or ``--launch`` server with it, the benchmark its
    server variants, the project's tests their real server processes. Use it as a
    context manager (started and ready on entry, stopped on exit), or call
    ``start``/``wait_ready``/``stop``.
    """

    argv: list[str]
    port: int
    workdir: Path
    expected_model: str | None = None
    startup_timeout_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    log_file: Path | None = None  # default: workdir/server.log
    owns_workdir: bool = False  # a workdir made here is removed on stop; a caller's is left alone
    cwd: Path | None = None  # the process's working directory (default: this process's)
    process: subprocess.Popen | None = None
    startup_trace: list[HealthProbe] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_file or self.workdir / "server.log"

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    @property
    def statuses(self) -> list[int | None]:
        """The HTTP status of every /health answer seen while starting (None: no connection yet)."""
        return [probe.status for probe in self.startup_trace]

    def log_text(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def __enter__(self) -> "ManagedServer":
        if self.process is None:
            self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop(keep_workdir=True)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @classmethod
    def prepare(cls, *, launch: str | None, model: str | None, api_key: str | None,
                startup_timeout_s: float) -> "ManagedServer":
        workdir = Path(tempfile.mkdtemp(prefix="capture-conformance-"))
        (workdir / "storage").mkdir()
        port = free_port()
        if launch:
            argv = launch_command(launch, port, str(workdir / "storage"))
        else:
            from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID

            model = model or TINY_MODEL_ID
            argv = bundled_command(port, model, str(workdir / "storage"), api_key)
        return cls(argv, port, workdir, expected_model=model, startup_timeout_s=startup_timeout_s, owns_workdir=True)

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.cwd, start_new_session=True,  # its own process group: stop() reaches its children too
            )

    def wait_ready(self) -> None:
        """Poll ``/health`` until it is 200 ``ok`` with the model listed; record every answer."""
        assert self.process is not None
        started = time.monotonic()
        deadline = started + self.startup_timeout_s
        session = requests.Session()
        while True:
            at = time.monotonic() - started
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"capture server exited with code {code} before it was ready "
                    f"(command: {shlex.join(self.argv)}); log tail:\n{log_tail(self.log_path)}"
                )
            probe = self._probe(session, at)
            self.startup_trace.append(probe)
            if self._is_ready(probe):
                return
            if time.monotonic() > deadline:
                seen = "; ".join(p.brief() for p in self.startup_trace[-3:])
                raise ServerStartError(
                    f"capture server not ready after {self.startup_timeout_s:g} s (last answers: {seen}); "
                    f"log tail:\n{log_tail(self.log_path)}"
                )
            time.sleep(POLL_INTERVAL_S)

    def _probe(self, session: requests.Session, at: float) -> HealthProbe:
        try:
            response = session.get(f"{self.base_url}/health", timeout=(1.0, 10.0))
        except requests.RequestException:
            return HealthProbe(at, None)
        try:
            body: object = response.json()
        except ValueError:
            body = response.text[:200]
        return HealthProbe(at, response.status_code, body)

    def _is_ready(self, probe: HealthProbe) -> bool:
        """200 with a capture server's health body (any dialect) that lists the expected model, or any."""
        body = probe.body
        if probe.status != 200 or not looks_like_capture_health(body) or body.get("status", "ok") != "ok":
            return False
        loaded = loaded_models(body, detect(body))
        return self.expected_model in loaded if self.expected_model else bool(loaded)

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def death_note(self) -> str:
        """Something to add to a refused connection: did the process die?"""
        code = self.exit_code()
        if code is None:
            return ""
        return f"the capture server process exited with code {code}; log tail:\n{log_tail(self.log_path)}"

    def stop(self, keep_workdir: bool = False) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=15)
        if not self.owns_workdir:
            return
        if keep_workdir:
            shutil.rmtree(self.storage_dir, ignore_errors=True)  # keep only the log
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def handoff(self) -> dict:
        """What an xdist worker needs to know about this server (plain data)."""
        return {
            "base_url": self.base_url,
            "managed": True,
            "pid": self.process.pid if self.process else None,
            "log_path": str(self.log_path),
            "storage_dir": str(self.storage_dir),
            "expected_model": self.expected_model,
            "command": shlex.join(self.argv),
            "startup_trace": [asdict(p) for p in self.startup_trace],
        }
