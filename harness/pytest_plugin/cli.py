"""``capture-conformance``: the conformance suites in one command, for people who do not live in pytest.

A thin face over the same engine: it builds a pytest command line (the installed
suites, the plugin's options, ``--conformance-report`` and ``--junitxml``), runs
it with ``pytest.main``, and exits 0 only when the chosen profile passed.
Anything after ``--`` goes to pytest unchanged (``-- -n 4 -k savepoints``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from capture_conformance.harness.protocol.probe import EXIT_NEEDS_KEY
from capture_conformance.harness.pytest_plugin.html_report import HTML_FILE
from capture_conformance.harness.pytest_plugin.options import FLAGS, forwarded
from capture_conformance.harness.pytest_plugin.plugin import SUITES_DIR
from capture_conformance.harness.pytest_plugin.report import REPORT_FILE, REPORT_PLUGIN

JUNIT_FILE = "conformance.junit.xml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capture-conformance",
        description="Check an NNsight activation-capture server against the capture protocol. Without --host or "
                    "--launch the bundled reference server is started on a free port.",
        epilog="Extra pytest arguments go after '--', e.g. capture-conformance -- -n 4 -k savepoints",
    )
    groups = {name: parser.add_argument_group(name) for name in dict.fromkeys(flag.group for flag in FLAGS)}
    for flag in FLAGS:  # the plugin's own flags, forwarded to pytest as given
        kwargs = {**flag.kwargs, "default": argparse.SUPPRESS}
        groups[flag.group].add_argument(flag.name, dest=flag.dest, help=flag.help, **kwargs)
    run = groups.setdefault("run", parser.add_argument_group("run"))
    run.add_argument("--report-dir", default="conformance-report",
                     help=f"where {REPORT_FILE}, {HTML_FILE} and {JUNIT_FILE} go (default: ./conformance-report)")
    run.add_argument("-v", "--verbose", action="store_true", help="one line per test")
    # syrupy's own flag (the pytest plugin that stores the snapshot files), offered here too
    groups["snapshots"].add_argument("--snapshot-update", action="store_true",
                                     help="rewrite the shape snapshots of this run")
    return parser


def pytest_args(options: argparse.Namespace, extra: list[str]) -> list[str]:
    report_dir = Path(options.report_dir)
    args = [str(SUITES_DIR), "--conformance-report", str(report_dir), f"--junitxml={report_dir / JUNIT_FILE}",
            "-p", "no:cacheprovider", "-v" if options.verbose else "-q"]
    if options.snapshot_update:
        args.append("--snapshot-update")
    return args + forwarded(options) + extra


class Verdict:
    """A pytest plugin that keeps the report's verdict when the run ends (no reading it back from disk)."""

    def __init__(self) -> None:
        self.passed: bool | None = None  # None: no report was made (a usage error, an aborted start)

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        report = config.pluginmanager.get_plugin(REPORT_PLUGIN)
        if report is not None and report.exit_status is not None:
            self.passed = report.passed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    options = parser.parse_args(argv)
    if getattr(options, "host", None) and getattr(options, "launch", None):
        parser.error("--host and --launch exclude each other")

    report_path = Path(options.report_dir) / REPORT_FILE
    report_path.unlink(missing_ok=True)  # never leave a previous run's verdict behind
    (report_path.parent / HTML_FILE).unlink(missing_ok=True)  # nor its page
    verdict = Verdict()
    exit_code = int(pytest.main(pytest_args(options, extra), plugins=[verdict]))
    if verdict.passed is None:
        if exit_code == EXIT_NEEDS_KEY:
            return exit_code  # pytest printed the one line that says so
        print(f"capture-conformance: no report was made (pytest exit status {exit_code})", file=sys.stderr)
        return exit_code or 1
    if verdict.passed and exit_code == 0:
        return 0
    return exit_code or 1


if __name__ == "__main__":
    sys.exit(main())
