"""The pytest plugin (entry point ``pytest11: capture_conformance``).

It is loaded into every pytest run of the environment it is installed in, so
everything here is inert unless the conformance suites are part of the run:
options are only read, the server is only started when a suite needs it (or,
under pytest-xdist, when the controller sees the suites among the run's paths),
profile deselection only touches items of the suites package, and the fixtures
themselves live in ``capture_conformance.harness.pytest_plugin.fixtures``, which only ``suites/conftest.py`` imports.

Who owns the server: the process that runs the tests, or under pytest-xdist the
controller, which starts it in ``pytest_sessionstart`` (before the workers
exist) and hands its URL to every worker through ``workerinput``. Workers never
start one. It is stopped in ``pytest_unconfigure``, which runs even when the
session was aborted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from capture_conformance.harness.pytest_plugin.areas import AREA_PROPERTY, AREAS, BY_NAME, FLEET_AREA, HOST_PROPERTY, MARKER
from capture_conformance.harness.protocol.missing import FeatureMissing
from capture_conformance.harness.pytest_plugin.options import PROFILES, Options, add_flags, host_label
from capture_conformance.harness.protocol.server import ManagedServer, ServerStartError
from capture_conformance.harness.pytest_plugin.state import STATE, HarnessState, Target, options_of

SUITES_DIR = Path(__file__).resolve().parent.parent.parent / "suites"
WORKERINPUT_KEY = "capture_conformance_target"




# -- options ---------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("capture-conformance", "NNsight capture server conformance")
    add_flags(group.addoption)
    group.addoption("--conformance-report", default=None, metavar="DIR",
                    help="write conformance-report.json into DIR and print the per-area table")


# -- wiring ----------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """``pytest --host H`` (or ``--port``, ``--launch``) with no paths: run the installed suites, and only them.

    From any directory, this clone included: a target option says "test that server", and a
    project's own ``testpaths`` (this clone's are its own tests and the suites) are not what
    it asks for. Paths given on the command line keep their meaning. Under pytest-xdist each
    worker is started with the controller's invocation arguments and runs this hook again, so
    controller and workers collect the same items; a run without a target option (``make
    test``: ``-n 2`` over testpaths tests and suites) is left alone.
    """
    known = early_config.known_args_namespace
    if not (getattr(known, "host", None) or getattr(known, "port", None) or getattr(known, "launch", None)):
        return
    if getattr(known, "file_or_dir", None):
        return
    args.append(str(SUITES_DIR))
    known.file_or_dir = [str(SUITES_DIR)]


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in (
        ("smoke", "conformance test of the smoke profile (runs in every profile)"),
        ("core", "conformance test of the core profile (the default for suites tests)"),
        ("full", "conformance test only run with --profile full"),
        ("managed_server", "needs a server started by this run (deselected with --host)"),
        ("needs_api_key", "needs --api-key (deselected without it)"),
        (f"{MARKER}(name)", "the conformance area of a suite module: " + ", ".join(a.name for a in AREAS)),
        ("dialect", "dialect(name): only for targets of that server family (deselected for the others when known)"),
    ):
        config.addinivalue_line("markers", f"{marker}: {text}")
    options = Options.of(config.getoption)
    config.stash[STATE] = HarnessState(options=options)
    if options.host and options.launch:
        raise pytest.UsageError("--host and --launch exclude each other: test a running server or start one")
    if options.launch and "{port}" not in options.launch:
        raise pytest.UsageError("--launch needs '{port}' in the command, where the server's port goes")
    if hasattr(config.option, "disable_unused_snapshots") and run_targets_suites(config):
        # The suites' snapshots are the harness's own (snapshots.py); only syrupy's option name,
        # --snapshot-update, is borrowed, and it is parsed by now. Syrupy itself would count every
        # shipped set as unused (failing the run, or deleting them with --snapshot-update) and print
        # its summary into every report, so it is switched off for the run.
        config.option.disable_unused_snapshots = True
        config.pluginmanager.set_blocked("syrupy")
    if config.getoption("conformance_report") and not is_xdist_worker(config):
        from capture_conformance.harness.pytest_plugin.report import REPORT_PLUGIN, ConformanceReport

        config.pluginmanager.register(ConformanceReport(config), REPORT_PLUGIN)
    if options.fleet and options.launch:
        raise pytest.UsageError("several --host and --launch exclude each other: a fleet run tests running servers")
    if options.remote_urls and not is_xdist_worker(config) and not _just_looking(config):
        from capture_conformance.harness.protocol.probe import EXIT_NEEDS_KEY, probe_capture_server, probe_key

        for url in options.remote_urls:  # every host of a fleet, before any test: one line for the one that is not up
            problem = probe_capture_server(url, options.api_key, options.startup_timeout)
            if problem:
                raise pytest.UsageError(problem)
            problem = probe_key(url, options.api_key)
            if problem:
                pytest.exit(problem, returncode=EXIT_NEEDS_KEY)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    # Under xdist the controller runs no tests: start the server now, before the workers exist.
    if config.pluginmanager.has_plugin("dsession") and not _just_looking(config) and run_targets_suites(config):
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        options = options_of(config)
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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A fleet run: every suite test that talks to a target runs once per host (the session fixtures with it)."""
    options = options_of(metafunc.config)
    if options.fleet and "capture_target" in metafunc.fixturenames and is_suite_path(Path(str(metafunc.definition.path))):
        urls = list(options.remote_urls)
        metafunc.parametrize("capture_target", urls, indirect=True, scope="session", ids=[host_label(u) for u in urls])
    if "fleet_host" in metafunc.fixturenames:  # the parity area: one verdict per host of the fleet
        urls = list(options.remote_urls)
        metafunc.parametrize("fleet_host", urls, ids=[host_label(u) for u in urls])


def host_of(item: pytest.Item) -> str | None:
    """The host a fleet run's suite item runs against (None outside a fleet run, and for the parity area)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("capture_target") if callspec is not None else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    options = options_of(config)
    wanted = PROFILES.index(options.profile)
    areas = set(options.areas)
    unknown = sorted(areas - set(BY_NAME))
    if unknown:
        raise pytest.UsageError(f"--area: unknown area(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    dialect = _known_dialect(config, options) if any(item.get_closest_marker("dialect") for item in items) else None
    keep, drop = [], []
    order = {area.name: index for index, area in enumerate(AREAS)}
    rank: dict[int, int] = {}  # suite item -> its area's place in AREAS
    for item in items:
        if not is_suite_item(item):
            keep.append(item)
            continue
        area = _declared_area(item)
        host = host_of(item)
        # A fleet run goes host by host (each host's session fixtures are set up once), areas in order within
        # each; the parity area, which talks to every host, comes last.
        hosts = options.remote_urls
        rank[id(item)] = ((hosts.index(host) if host in hosts else len(hosts)) * (len(order) + 1)
                          + order.get(area, len(order)))
        item.user_properties.append((AREA_PROPERTY, area))
        if host is not None:
            item.user_properties.append((HOST_PROPERTY, host))
        level = "smoke" if item.get_closest_marker("smoke") else "full" if item.get_closest_marker("full") else "core"
        excluded = (
            PROFILES.index(level) > wanted
            or (item.get_closest_marker("managed_server") and options.remote_url is not None)
            or (item.get_closest_marker("needs_api_key") and not options.api_key)
            or (areas and area not in areas)
            or (area == FLEET_AREA and not options.fleet)  # parity needs two hosts or more
            or (dialect is not None and item.get_closest_marker("dialect") is not None
                and dialect not in item.get_closest_marker("dialect").args)
        )
        (drop if excluded else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    # Areas run in the order of AREAS (health first: a server that is not up fails there, once, and
    # `-x` stops before a hundred failures that all mean "not up"); the sort is stable, so tests keep
    # their order within an area and module-scoped fixtures are set up once.
    items[:] = sorted(keep, key=lambda item: rank.get(id(item), -1))


# The protocol library signals "the target lacks this" with FeatureMissing (it imports no pytest):
# in a fixture or in a test, that is a skip naming what is missing, never a failure.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    try:
        return (yield)
    except FeatureMissing as missing:
        pytest.skip(str(missing))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    try:
        return (yield)
    except FeatureMissing as missing:
        pytest.skip(str(missing))


def _declared_area(item: pytest.Item) -> str:
    marker = item.get_closest_marker(MARKER)
    if marker is None or not marker.args or marker.args[0] not in BY_NAME:
        raise pytest.UsageError(
            f"{item.nodeid}: a suite module declares its area with pytestmark = pytest.mark.{MARKER}(NAME), "
            f"NAME one of {', '.join(BY_NAME)}; found {marker.args if marker else 'none'}")
    return marker.args[0]


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    options = options_of(config)
    if not (options.remote_url or options.launch or run_targets_suites(config)):
        return None
    where = options.remote_url or (f"launch: {options.launch}" if options.launch else "bundled reference server")
    if options.fleet:
        where = f"fleet of {len(options.remote_urls)} hosts: {', '.join(options.remote_urls)}"
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
    options = options_of(config)
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
    from capture_conformance.harness.protocol.dialects import V1, detect

    if options.dialect != "auto":
        return options.dialect
    if options.remote_urls:
        from capture_conformance.harness.protocol.client import CaptureClient, ServerFault

        try:
            found = {detect(CaptureClient(url, api_key=options.api_key, timeout_s=10.0).health().json())
                     for url in options.remote_urls}
        except ServerFault:
            return None
        return found.pop() if len(found) == 1 else None  # a mixed fleet: dialect tests skip at run time instead
    return None if options.launch else V1


def is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def is_suite_item(item: pytest.Item) -> bool:
    return is_suite_path(Path(str(item.path)))


def is_suite_path(path: Path) -> bool:
    return _within(path, SUITES_DIR)


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
