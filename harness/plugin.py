"""The pytest plugin (entry point ``pytest11: capture_conformance``).

It is loaded into every pytest run of the environment it is installed in, so
everything here is inert unless the conformance suites are part of the run:
options are only read, the server is only started when a suite needs it (or,
under pytest-xdist, when the controller sees the suites among the run's paths),
profile deselection only touches items of the suites package, and the fixtures
themselves live in ``harness.fixtures``, which only ``suites/conftest.py`` imports.

Who owns the server: the process that runs the tests, or under pytest-xdist the
controller, which starts it in ``pytest_sessionstart`` (before the workers
exist) and hands its URL to every worker through ``workerinput``. Workers never
start one. It is stopped in ``pytest_unconfigure``, which runs even when the
session was aborted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.server import HealthProbe, ManagedServer, ServerStartError, log_tail

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
DEFAULT_PORT = 8006
PROFILES = ("smoke", "core", "full")
WORKERINPUT_KEY = "capture_conformance_target"


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
    facts: dict = field(default_factory=dict)  # model and ground truth as the tests saw them, for the report


STATE = pytest.StashKey[HarnessState]()


# -- options ---------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("capture-conformance", "NNsight capture server conformance")
    group.addoption("--host", default=None,
                    help="test the capture server at this host (or http://host:port URL) instead of starting the bundled one")
    group.addoption("--port", type=int, default=None, help=f"port of --host (default {DEFAULT_PORT})")
    group.addoption("--api-key", default=os.environ.get("CAPTURE_API_KEY"),
                    help="send 'Authorization: Bearer KEY' (default: $CAPTURE_API_KEY)")
    group.addoption("--model", default=None,
                    help="model to load/use on the target (default: the bundled tiny model when bundled, "
                         "else the first of /health's loaded_models)")
    group.addoption("--expect-vocab", type=int, default=None,
                    help="vocab size of --model, when its config.json is not available locally")
    group.addoption("--expect-hidden", type=int, default=None,
                    help="hidden size of --model, when its config.json is not available locally")
    group.addoption("--expect-layers", type=int, default=None,
                    help="number of decoder layers of --model, when its config.json is not available locally")
    group.addoption("--profile", choices=PROFILES, default="core",
                    help="smoke: a minute's sanity; core (default): the contract; full: plus the larger matrices")
    group.addoption("--launch", default=None, metavar="CMD",
                    help="start this server command instead of the bundled server; '{port}' is replaced by a free "
                         "port, '{storage_dir}' by a temporary directory, a leading 'python' by this interpreter")
    group.addoption("--request-timeout", type=float, default=120.0,
                    help="seconds allowed for any one request to the server (default 120)")
    group.addoption("--startup-timeout", type=float, default=300.0,
                    help="seconds allowed for a started server to become ready (default 300)")
    group.addoption("--snapshot-dir", default=None,
                    help="root of the per-model shape snapshot sets, read and written (default: ./capture-snapshots "
                         "in the working directory; the set shipped with the suites is read when that has none). "
                         "A missing snapshot is recorded; --snapshot-update rewrites them")
    group.addoption("--dialect", choices=("auto", "protocol-v1", "store_activations", "interventions"),
                    default="auto", help="the server family to speak (default: detected from /health); checks of "
                                         "fields a dialect lacks are reported once as missing from protocol v1")
    group.addoption("--ci", action="store_true", default=False,
                    help="CI run: a missing shape snapshot fails instead of being recorded (also when CI=true)")
    group.addoption("--conformance-report", default=None, metavar="DIR",
                    help="write conformance-report.json into DIR and print the per-area table")


@dataclass(frozen=True)
class Options:
    host: str | None
    port: int | None
    api_key: str | None
    model: str | None
    expect_vocab: int | None
    expect_hidden: int | None
    expect_layers: int | None
    profile: str
    launch: str | None
    request_timeout: float
    startup_timeout: float
    snapshot_dir: str | None
    ci: bool = False
    dialect: str = "auto"

    @classmethod
    def of(cls, config: pytest.Config) -> "Options":
        get = config.getoption
        return cls(get("host"), get("port"), get("api_key"), get("model"), get("expect_vocab"),
                   get("expect_hidden"), get("expect_layers"), get("profile"), get("launch"),
                   get("request_timeout"), get("startup_timeout"), get("snapshot_dir"), get("ci"), get("dialect"))

    @property
    def remote_url(self) -> str | None:
        """The URL of ``--host`` (``--port`` alone means localhost), or None when we start a server."""
        if self.host is None and self.port is None:
            return None
        host = self.host or "127.0.0.1"
        if host.startswith(("http://", "https://")):
            return host.rstrip("/") if self.port is None else f"{host.rstrip('/')}:{self.port}"
        return f"http://{host}:{self.port or DEFAULT_PORT}"


# -- wiring ----------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """``pytest --host H`` with no paths, outside a project with testpaths: run the installed suites."""
    known = early_config.known_args_namespace
    if not (getattr(known, "host", None) or getattr(known, "port", None) or getattr(known, "launch", None)):
        return
    if getattr(known, "file_or_dir", None):
        return
    if early_config.invocation_params.dir == early_config.rootpath and early_config.getini("testpaths"):
        return  # a project that says what its tests are keeps that choice
    args.append(str(SUITES_DIR))
    known.file_or_dir = [str(SUITES_DIR)]


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in (
        ("smoke", "conformance test of the smoke profile (runs in every profile)"),
        ("core", "conformance test of the core profile (the default for suites tests)"),
        ("full", "conformance test only run with --profile full"),
        ("managed_server", "needs a server started by this run (deselected with --host)"),
        ("needs_api_key", "needs --api-key (deselected without it)"),
        ("dialect", "dialect(name): only for targets of that server family (deselected for the others when known)"),
    ):
        config.addinivalue_line("markers", f"{marker}: {text}")
    config.stash[STATE] = HarnessState()
    options = Options.of(config)
    if options.host and options.launch:
        raise pytest.UsageError("--host and --launch exclude each other: test a running server or start one")
    if options.launch and "{port}" not in options.launch:
        raise pytest.UsageError("--launch needs '{port}' in the command, where the server's port goes")
    if hasattr(config.option, "disable_unused_snapshots") and run_targets_suites(config):
        # Which shape snapshots a run uses depends on the profile, the model and -k; syrupy's
        # unused-snapshot accounting (worse under xdist) would fail, or with --snapshot-update
        # delete, the sets of tests that merely did not run. Obsolete files are removed by hand.
        config.option.disable_unused_snapshots = True
    if config.getoption("conformance_report") and not is_xdist_worker(config):
        from harness.report import ConformanceReport

        config.pluginmanager.register(ConformanceReport(config), "capture_conformance_report")
    if options.remote_url and not is_xdist_worker(config) and not _just_looking(config):
        from harness.probe import probe_capture_server

        problem = probe_capture_server(options.remote_url, options.api_key, options.startup_timeout)
        if problem:
            raise pytest.UsageError(problem)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    # Under xdist the controller runs no tests: start the server now, before the workers exist.
    if config.pluginmanager.has_plugin("dsession") and not _just_looking(config) and run_targets_suites(config):
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        options = Options.of(config)
        if reporter is not None and not options.remote_url:
            reporter.write_line("capture-conformance: starting the capture server for the workers...")
        acquire_target(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist (controller): give each worker the server's URL and what it needs to explain a death."""
    state = node.config.stash[STATE]
    if state.target is not None:
        target = state.target
        node.workerinput[WORKERINPUT_KEY] = (
            target.server.handoff() if target.server else {"base_url": target.base_url, "managed": False}
        )


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist (controller): keep the facts a worker learnt (model, ground truth) for the report."""
    facts = getattr(node, "workeroutput", {}).get(WORKERINPUT_KEY)
    if facts:
        node.config.stash[STATE].facts.update(facts)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if is_xdist_worker(config) and STATE in config.stash and config.stash[STATE].facts:
        config.workeroutput[WORKERINPUT_KEY] = dict(config.stash[STATE].facts)  # type: ignore[attr-defined]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    options = Options.of(config)
    wanted = PROFILES.index(options.profile)
    dialect = _known_dialect(config, options) if any(item.get_closest_marker("dialect") for item in items) else None
    keep, drop = [], []
    for item in items:
        if not is_suite_item(item):
            keep.append(item)
            continue
        level = "smoke" if item.get_closest_marker("smoke") else "full" if item.get_closest_marker("full") else "core"
        excluded = (
            PROFILES.index(level) > wanted
            or (item.get_closest_marker("managed_server") and options.remote_url is not None)
            or (item.get_closest_marker("needs_api_key") and not options.api_key)
            or (dialect is not None and item.get_closest_marker("dialect") is not None
                and dialect not in item.get_closest_marker("dialect").args)
        )
        (drop if excluded else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    options = Options.of(config)
    if not (options.remote_url or options.launch or run_targets_suites(config)):
        return None
    where = options.remote_url or (f"launch: {options.launch}" if options.launch else "bundled reference server")
    return [f"capture-conformance: target {where}, profile {options.profile}"]


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is not None and state.server is not None:
        state.server.stop(keep_workdir=state.failed_start)
        state.server = None


# -- the target ------------------------------------------------------------------------------


def acquire_target(config: pytest.Config) -> Target:
    """The server of this run: handed over (xdist worker), remote (--host), or started now."""
    state = config.stash[STATE]
    if state.target is not None:
        return state.target
    options = Options.of(config)
    if is_xdist_worker(config):
        handed = config.workerinput.get(WORKERINPUT_KEY)  # type: ignore[attr-defined]
        if handed is None:
            pytest.fail(
                "the pytest-xdist controller started no capture server for this run (it did not see the suites "
                "among the run's paths); name the suites path explicitly or use --host", pytrace=False)
        state.target = Target.from_handoff(handed)
        return state.target
    if options.remote_url:
        state.target = Target(options.remote_url, managed=False)
        return state.target
    server = ManagedServer.prepare(launch=options.launch, model=options.model, api_key=options.api_key,
                                   startup_timeout_s=options.startup_timeout)
    state.server = server
    try:
        server.start()
        server.wait_ready()
    except (ServerStartError, OSError) as exc:
        state.failed_start = True
        pytest.exit(f"capture-conformance: {exc}", returncode=3)
    handoff = server.handoff()
    state.target = Target.from_handoff(handoff)
    state.target.server = server
    return state.target


# -- helpers ---------------------------------------------------------------------------------


def _known_dialect(config: pytest.Config, options: Options) -> str | None:
    """The target's dialect where it is known before any test: forced, the bundled server, or a --host's /health.

    None for a --launch command (not started yet): its dialect-specific tests then skip at run time instead.
    """
    from harness.dialects import V1, detect

    if options.dialect != "auto":
        return options.dialect
    if options.remote_url:
        from harness.client import CaptureClient, ServerFault

        try:
            return detect(CaptureClient(options.remote_url, api_key=options.api_key, timeout_s=10.0).health().json())
        except ServerFault:
            return None
    return None if options.launch else V1


def is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def is_suite_item(item: pytest.Item) -> bool:
    return _within(Path(str(item.path)), SUITES_DIR)


def run_targets_suites(config: pytest.Config) -> bool:
    """Whether the run's paths include the suites (the suites dir, a file in it, or a parent of it)."""
    for arg in config.args:
        if config.option.pyargs and (arg == SUITES_DIR.name or arg.startswith(SUITES_DIR.name + ".")):
            return True
        path = Path(arg.split("::", 1)[0])
        if not path.is_absolute():
            path = config.invocation_params.dir / path
        if _within(path, SUITES_DIR) or _within(SUITES_DIR, path):
            return True
    return False


def _within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except (ValueError, OSError):
        return False


def _just_looking(config: pytest.Config) -> bool:
    option = config.option
    return bool(getattr(option, "help", False) or getattr(option, "collectonly", False)
                or getattr(option, "version", False) or getattr(option, "markers", False)
                or getattr(option, "showfixtures", False))
