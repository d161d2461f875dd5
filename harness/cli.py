"""``capture-conformance``: the conformance suites in one command, for people who do not live in pytest.

A thin face over the same engine: it builds a pytest command line (the installed
suites, the plugin's options, ``--conformance-report`` and ``--junitxml``), runs
it with ``pytest.main``, and exits 0 only when the chosen profile passed.
Anything after ``--`` goes to pytest unchanged (``-- -n 4 -k savepoints``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.html_report import HTML_FILE
from harness.plugin import PROFILES, SUITES_DIR
from harness.report import REPORT_FILE

JUNIT_FILE = "conformance.junit.xml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capture-conformance",
        description="Check an NNsight activation-capture server against capture protocol v1. Without --host or "
                    "--launch the bundled reference server is started on a free port.",
        epilog="Extra pytest arguments go after '--', e.g. capture-conformance -- -n 4 -k savepoints",
    )
    target = parser.add_argument_group("target")
    target.add_argument("--host", help="host (or http://host:port URL) of a running capture server")
    target.add_argument("--port", type=int, help="its port (default 8006)")
    target.add_argument("--launch", metavar="CMD",
                        help="start this server command ('{port}' is replaced by a free port), test it, stop it")
    target.add_argument("--api-key", help="Bearer key for the server")
    target.add_argument("--model", help="model to load/use on the server")
    target.add_argument("--dialect", choices=("auto", "protocol-v1", "store_activations", "interventions"),
                        help="the server family (default: detected from /health)")
    truth = parser.add_argument_group("ground truth, when the model's config.json is not available locally")
    truth.add_argument("--expect-vocab", type=int)
    truth.add_argument("--expect-hidden", type=int)
    truth.add_argument("--expect-layers", type=int)
    run = parser.add_argument_group("run")
    run.add_argument("--profile", choices=PROFILES, default="core", help="default: core")
    run.add_argument("--report-dir", default="conformance-report",
                     help=f"where {REPORT_FILE}, {HTML_FILE} and {JUNIT_FILE} go (default: ./conformance-report)")
    run.add_argument("--request-timeout", type=float, help="seconds per request (default 120)")
    run.add_argument("--startup-timeout", type=float, help="seconds for a started server to get ready (default 300)")
    run.add_argument("-v", "--verbose", action="store_true", help="one line per test")
    snaps = parser.add_argument_group("shape snapshots (regression, recorded on the first run of a model)")
    snaps.add_argument("--snapshot-dir", help="where the per-model sets are read and recorded (default: "
                                              "./capture-snapshots; the set shipped for tiny-qwen3 is also read)")
    snaps.add_argument("--snapshot-update", action="store_true", help="rewrite the snapshots of this run")
    snaps.add_argument("--ci", action="store_true", help="a missing snapshot fails instead of being recorded "
                                                         "(also when the environment has CI=true)")
    return parser


def pytest_args(options: argparse.Namespace, extra: list[str]) -> list[str]:
    report_dir = Path(options.report_dir)
    args = [str(SUITES_DIR), "--profile", options.profile, "--conformance-report", str(report_dir),
            f"--junitxml={report_dir / JUNIT_FILE}", "-p", "no:cacheprovider", "-v" if options.verbose else "-q"]
    for flag in ("host", "port", "launch", "api_key", "model", "expect_vocab", "expect_hidden", "expect_layers",
                 "request_timeout", "startup_timeout", "snapshot_dir", "dialect"):
        value = getattr(options, flag)
        if value is not None:
            args += [f"--{flag.replace('_', '-')}", str(value)]
    for flag in ("snapshot_update", "ci"):
        if getattr(options, flag):
            args.append(f"--{flag.replace('_', '-')}")
    return args + extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    options = build_parser().parse_args(argv)
    if options.host and options.launch:
        build_parser().error("--host and --launch exclude each other")

    import pytest

    report_path = Path(options.report_dir) / REPORT_FILE
    report_path.unlink(missing_ok=True)  # never read a previous run's verdict
    (report_path.parent / HTML_FILE).unlink(missing_ok=True)  # nor leave a previous run's page behind
    exit_code = int(pytest.main(pytest_args(options, extra)))
    if not report_path.is_file():
        print(f"capture-conformance: no report was written (pytest exit status {exit_code})", file=sys.stderr)
        return exit_code or 1
    report = json.loads(report_path.read_text())
    if report.get("passed") and exit_code == 0:
        return 0
    return exit_code or 1


if __name__ == "__main__":
    sys.exit(main())
