"""What one pytest run knows about its target, shared by the plugin, the fixtures and the report.

Kept apart from the plugin so that the report and the fixtures read the run's
state without importing the plugin (and the plugin imports neither of them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from capture_conformance.harness.pytest_plugin.options import Options
from capture_conformance.harness.protocol.server import HealthProbe, ManagedServer, log_tail


@dataclass
class Target:
    """The server the suites talk to, as every process (controller or worker) sees it."""

    base_url: str
    managed: bool
    expected_model: str | None = None
    log_path: str | None = None
    storage_dir: str | None = None
    pid: int | None = None
    command: str | None = None
    startup_trace: list[HealthProbe] = field(default_factory=list)
    server: ManagedServer | None = field(default=None, repr=False)  # only in the owning process

    @classmethod
    def from_handoff(cls, data: dict) -> "Target":
        trace = [HealthProbe(**p) for p in data.get("startup_trace", [])]
        return cls(data["base_url"], data["managed"], data.get("expected_model"), data.get("log_path"),
                   data.get("storage_dir"), data.get("pid"), data.get("command"), trace)

    def death_note(self) -> str:
        """Added to a refused connection: whether a managed server died, with its log tail."""
        if self.server is not None:
            return self.server.death_note()
        if self.managed and self.pid:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return f"the capture server process {self.pid} is gone; log tail:\n{log_tail(self.log_path)}"
            except PermissionError:
                pass
        return ""


@dataclass
class HarnessState:
    target: Target | None = None
    server: ManagedServer | None = None
    failed_start: bool = False
    options: "Options | None" = None  # read once, in pytest_configure
    facts: dict = field(default_factory=dict)  # model and ground truth as the tests saw them, for the report
    # A fleet run (several --host): the host whose session fixtures are set up now; facts are kept per host.
    current_host: str | None = None

    def record(self, key: str, value: object) -> None:
        """One fact for the report; in a fleet run under the current host's prefix (see ``host_facts``)."""
        self.facts[fact_key(self.current_host, key)] = value


HOST_FACT = "host:"  # "host:<url>|<key>": a fact of one host of a fleet run


def fact_key(host: str | None, key: str) -> str:
    return key if host is None else f"{HOST_FACT}{host}|{key}"


def host_facts(facts: dict, host: str | None) -> dict:
    """The facts of one host of a fleet run (``None``: a single-target run's own, unprefixed facts)."""
    if host is None:
        return {k: v for k, v in facts.items() if not k.startswith(HOST_FACT)}
    prefix = f"{HOST_FACT}{host}|"
    return {k[len(prefix):]: v for k, v in facts.items() if k.startswith(prefix)}


STATE = pytest.StashKey[HarnessState]()


def options_of(config: pytest.Config) -> Options:
    """The run's options, as read once in pytest_configure."""
    return config.stash[STATE].options
