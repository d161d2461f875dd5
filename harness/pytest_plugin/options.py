"""The harness's options, declared once: the pytest plugin and ``capture-conformance`` both build from this table.

The plugin adds every flag to pytest's parser; the CLI offers the same flags and
forwards the ones given to ``pytest.main`` unchanged, so the two faces cannot
drift apart. ``Options`` is the typed view of a run's values.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from typing import Any, Callable

from capture_conformance.harness.pytest_plugin.areas import AREAS, FEATURES
from capture_conformance.harness.protocol.client import DEFAULT_PORT

PROFILES = ("smoke", "core", "full")


@dataclass(frozen=True)
class Flag:
    name: str  # "--host"
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # argparse keywords: type, default, choices, action, metavar
    group: str = "target"  # the CLI's help group

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("--host", "test the capture server at this host (HOST, HOST:PORT or an http://host:port URL) instead of "
                   "starting the bundled one; repeat for a fleet: every host runs the suites, and the parity area "
                   "replays the same greedy requests on all of them", {"action": "append", "default": []}),
    Flag("--port", f"port of a --host given without one (default {DEFAULT_PORT})", {"type": int}),
    Flag("--launch", "start this server command instead of the bundled server; '{port}' is replaced by a free port, "
                     "'{storage_dir}' by a temporary directory, a leading 'python' by this interpreter",
         {"metavar": "CMD"}),
    Flag("--api-key", "send 'Authorization: Bearer KEY' (default: $CAPTURE_API_KEY)",
         {"default": os.environ.get("CAPTURE_API_KEY")}),
    Flag("--model", "model to load/use on the target (default: the bundled tiny model when bundled, else the first "
                    "of /health's loaded_models)"),
    Flag("--expect-vocab", "vocab size of --model, when its config.json is not available locally", {"type": int},
         "ground truth"),
    Flag("--expect-hidden", "hidden size of --model, when its config.json is not available locally", {"type": int},
         "ground truth"),
    Flag("--expect-layers", "number of decoder layers of --model, when its config.json is not available locally",
         {"type": int}, "ground truth"),
    Flag("--profile", "smoke: a minute's sanity; core (default): the contract; full: plus the larger matrices",
         {"choices": PROFILES, "default": "core"}, "run"),
    Flag("--area", "run only this conformance area (repeat or comma-separate for several): "
                   + ", ".join(a.name for a in AREAS), {"action": "append", "default": [], "metavar": "NAME"}, "run"),
    Flag("--require-feature", "fail, not skip, when the target lacks this optional feature (repeatable): "
                              + ", ".join(FEATURES) + "; the bundled server is held to all of them",
         {"action": "append", "default": [], "choices": FEATURES, "metavar": "FEATURE"}, "run"),
    Flag("--request-timeout", "seconds allowed for any one request to the server (default 120)",
         {"type": float, "default": 120.0}, "run"),
    Flag("--startup-timeout", "seconds allowed for a started server to become ready (default 300)",
         {"type": float, "default": 300.0}, "run"),
    # The values area (harness/reference.py): an independent forward pass of the same checkpoint.
    Flag("--reference-model", "checkpoint for the values area's reference computation: a local directory or a Hugging "
                              "Face id already in the local cache (default: --model, found locally)",
         {"metavar": "DIR_OR_ID"}, "values"),
    Flag("--reference-device", "torch device of the reference computation (default cpu)", {"default": "cpu"}, "values"),
    Flag("--value-tolerance", "relative error allowed between a captured value and the reference (default: derived "
                              "from the server's model dtype and the capture dtype)",
         {"type": float, "metavar": "REL"}, "values"),
    Flag("--dialect", "the server family to speak (default: detected from /health); checks of fields a dialect lacks "
                      "are reported once as missing from protocol v1",
         {"choices": ("auto", "protocol-v1", "store_activations", "interventions"), "default": "auto"}),
    Flag("--snapshot-dir", "root of the per-model shape snapshot sets, read and written (default: ./capture-snapshots "
                           "in the working directory; the set shipped with the suites is read when that has none). "
                           "A missing snapshot is recorded; --snapshot-update rewrites them", {}, "snapshots"),
    Flag("--keep-runs", "keep the runs the suites create on the target (by default each is deleted at the end, "
                        "where the server has DELETE; the report says how many were left and why)",
         {"action": "store_true", "default": False}),
    Flag("--ci", "CI run: a missing shape snapshot fails instead of being recorded (also when CI=true)",
         {"action": "store_true", "default": False}, "snapshots"),
)


def host_url(host: str, port: int | None) -> str:
    """``HOST``, ``HOST:PORT`` or a URL as a base URL; ``port`` applies where the host names none."""
    if host.startswith(("http://", "https://")):
        scheme, _, rest = host.rstrip("/").partition("://")
        if port is not None and not _has_port(rest):
            return f"{scheme}://{rest}:{port}"
        return f"{scheme}://{rest}"
    if _has_port(host):
        return f"http://{host}"
    return f"http://{host}:{port or DEFAULT_PORT}"


def host_label(url: str) -> str:
    """A host's name in test ids and snapshot lookups: ``http://127.0.0.1:8006`` -> ``127.0.0.1:8006``."""
    parts = urlsplit(url)
    return (parts.netloc + parts.path.rstrip("/")) or url


def _has_port(authority: str) -> bool:
    """``a:1``, ``[::1]:8006``, ``a:1/prefix``; not ``[::1]`` or a bare host."""
    authority = authority.split("/", 1)[0]
    if authority.startswith("["):
        return "]:" in authority
    return authority.count(":") == 1 and authority.rsplit(":", 1)[1].isdigit()


def add_flags(add: Callable[..., Any]) -> None:
    """Declare every flag through ``add``: pytest's ``group.addoption``."""
    for flag in FLAGS:
        add(flag.name, dest=flag.dest, help=flag.help, **flag.kwargs)


def forwarded(namespace: argparse.Namespace) -> list[str]:
    """The pytest arguments that repeat what the user gave the CLI."""
    args: list[str] = []
    for flag in FLAGS:
        if not hasattr(namespace, flag.dest):
            continue
        value = getattr(namespace, flag.dest)
        if flag.kwargs.get("action") == "store_true":
            args += [flag.name] if value else []
            continue
        for item in value if isinstance(value, list) else [value]:
            args += [flag.name, str(item)]
    return args


@dataclass(frozen=True)
class Options:
    """A run's values of the flags above, read once from pytest's config."""

    hosts: tuple[str, ...]
    port: int | None
    launch: str | None
    api_key: str | None
    model: str | None
    expect_vocab: int | None
    expect_hidden: int | None
    expect_layers: int | None
    profile: str
    areas: tuple[str, ...]
    required_features: tuple[str, ...]
    request_timeout: float
    startup_timeout: float
    snapshot_dir: str | None
    ci: bool = False
    dialect: str = "auto"
    keep_runs: bool = False

    @classmethod
    def of(cls, getoption: Callable[[str], Any]) -> "Options":
        get = getoption
        areas = tuple(name.strip() for value in get("area") or () for name in value.split(",") if name.strip())
        hosts = tuple(get("host") or ())
        return cls(hosts, get("port"), get("launch"), get("api_key"), get("model"), get("expect_vocab"),
                   get("expect_hidden"), get("expect_layers"), get("profile"), areas,
                   tuple(get("require_feature") or ()), get("request_timeout"), get("startup_timeout"),
                   get("snapshot_dir"), bool(get("ci")), get("dialect") or "auto", bool(get("keep_runs")))

    @property
    def host(self) -> str | None:
        return self.hosts[0] if self.hosts else None

    @property
    def remote_urls(self) -> tuple[str, ...]:
        """The URL of every ``--host`` (``--port`` alone means localhost); empty when we start a server."""
        if not self.hosts:
            return () if self.port is None else (host_url("127.0.0.1", self.port),)
        return tuple(dict.fromkeys(host_url(host, self.port) for host in self.hosts))

    @property
    def remote_url(self) -> str | None:
        """The URL of the (first) ``--host``, or None when we start a server."""
        return self.remote_urls[0] if self.remote_urls else None

    @property
    def fleet(self) -> bool:
        """Several hosts: each runs the suites (a parametrisation of the target), and the parity area runs."""
        return len(self.remote_urls) > 1

    def requires(self, feature: str) -> bool:
        """Whether lacking ``feature`` fails the run: asked for, or the bundled server (which has every one)."""
        bundled = self.remote_url is None and self.launch is None
        return bundled or feature in self.required_features
