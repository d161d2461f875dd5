"""The conformance report: a per-area table, the capture level reached, ``conformance-report.json``.

A pytest plugin object, registered by ``--conformance-report DIR`` (which
``capture-conformance`` always passes), so plain ``pytest`` and the CLI produce
the same report from the same run. Under pytest-xdist it lives in the
controller, which sees every worker's test reports.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from capture_conformance.harness import PROTOCOL_VERSION
from capture_conformance.harness.pytest_plugin.areas import AREA_PROPERTY, HOST_PROPERTY, OPTIONAL_AREAS, REQUIRED_AREAS
from capture_conformance.harness.pytest_plugin.diagnoses import group as group_causes
from capture_conformance.harness.pytest_plugin.diagnoses import missing_features
from capture_conformance.harness.pytest_plugin.html_report import HTML_FILE, write_html
from capture_conformance.harness.protocol.cleanup import merge as merge_cleanups
from capture_conformance.harness.pytest_plugin.snapshots import USER_PROPERTY

REPORT_FILE = "conformance-report.json"
REPORT_PLUGIN = "capture_conformance_report"  # the name the plugin registers the report under
# Areas the protocol does not require (OPTIONAL_AREAS) are shown in the table, not needed for any capture level.
AREAS = REQUIRED_AREAS
# Without a reference computation the values area is skipped with this reason prefix: the
# shapes may all be right, but the capture level then says "shapes only".
VALUES_AREA = "values"
NOT_VERIFIABLE = "values not verifiable"
# Each level needs its areas (and those of the levels below) to have run and passed.
LEVELS = [
    ("single-token", ["single_token"]),
    ("multi-token", ["multi_token"]),
    ("savepoints", ["savepoints"]),
    ("full", AREAS),
]
MESSAGE_CHARS = 2000  # a values failure names every savepoint it compared: keep them all


@dataclass
class CaseResult:
    nodeid: str
    area: str
    outcome: str  # passed, failed, error, skipped
    duration_s: float = 0.0
    message: str = ""
    snapshot: dict | None = None  # {"outcome": recorded|compared|updated, "path", "model"} for snapshot tests
    host: str | None = None  # a fleet run: the host the test ran against (None: a single target, or the parity area)


@dataclass
class AreaSummary:
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    first_failure: dict | None = None

    @property
    def clean(self) -> bool:
        return self.passed > 0 and self.failed == 0 and self.errors == 0


@dataclass
class Summary:
    areas: dict[str, AreaSummary] = field(default_factory=dict)
    capture_level: str = "none"
    passed: bool = False
    values: str = "not run"  # verified, not verifiable: <reason>, failed, not run


def area_of(report: pytest.TestReport) -> str | None:
    """The area a conformance test declared (the plugin puts it in the report's user properties), else None."""
    return dict(report.user_properties).get(AREA_PROPERTY)


def summarize(results: list[CaseResult]) -> Summary:
    summary = Summary()
    for area in AREAS + OPTIONAL_AREAS:
        if any(r.area == area for r in results):
            summary.areas[area] = AreaSummary()
    for result in results:
        area = summary.areas.setdefault(result.area, AreaSummary())
        if result.outcome == "passed":
            area.passed += 1
        elif result.outcome == "skipped":
            area.skipped += 1
        else:
            if result.outcome == "failed":
                area.failed += 1
            else:
                area.errors += 1
            if area.first_failure is None:
                area.first_failure = {"test": result.nodeid.split("::", 1)[-1], "message": result.message}
    clean = {name for name, area in summary.areas.items() if area.clean}
    values = summary.areas.get(VALUES_AREA)
    unverifiable = [r for r in results if r.area == VALUES_AREA and r.outcome == "skipped"
                    and r.message.startswith(NOT_VERIFIABLE)]
    if values is not None:
        if values.failed or values.errors:
            summary.values = "failed"
        elif unverifiable:
            summary.values = unverifiable[0].message
            clean.add(VALUES_AREA)  # not broken, only unverified: the level below says "shapes only"
        elif values.clean:
            summary.values = "verified"
    needed: set[str] = set()
    for level, areas in LEVELS:
        needed |= set(areas)
        if needed <= clean:
            summary.capture_level = level
        else:
            break
    if summary.values.startswith(NOT_VERIFIABLE) and summary.capture_level != "none":
        summary.capture_level += " (shapes only)"
    summary.passed = bool(results) and all(a.failed == 0 and a.errors == 0 for a in summary.areas.values()) and any(
        a.passed for a in summary.areas.values())
    return summary


def snapshot_summary(results: list[CaseResult]) -> dict[str, Any]:
    """Which snapshot tests recorded, updated or compared their snapshot, and where the files are."""
    out: dict[str, Any] = {"recorded": [], "updated": [], "compared": [], "dirs": []}
    for result in results:
        snap = result.snapshot
        if not snap or snap.get("outcome") not in ("recorded", "updated", "compared"):
            continue
        out[snap["outcome"]].append(result.nodeid.split("::", 1)[-1])
        # <root>/<model>/<module>/<test>.json: the model's directory is what a person commits
        model_dir = str(Path(snap.get("path", "")).parent.parent)
        if snap["outcome"] != "compared" and model_dir not in out["dirs"]:
            out["dirs"].append(model_dir)
    return out


def _message(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr)
    text = text.strip()
    for prefix in ("AssertionError: ", "capture_conformance.harness.protocol.client.ServerFault: ", "Failed: "):
        text = text.removeprefix(prefix)
    return text[:MESSAGE_CHARS]


class ConformanceReport:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.directory = Path(config.getoption("conformance_report"))
        self.results: dict[str, CaseResult] = {}
        self.started = time.time()
        self.exit_status: int | None = None
        self._summary: Summary | None = None

    # -- collecting ---------------------------------------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        area = area_of(report)
        if area is None:
            return  # not a conformance test
        result = self.results.get(report.nodeid)
        if result is None:
            result = self.results[report.nodeid] = CaseResult(report.nodeid, area, "passed")
        result.duration_s += report.duration
        for key, value in getattr(report, "user_properties", None) or ():
            if key == USER_PROPERTY and isinstance(value, dict):
                result.snapshot = value
            elif key == HOST_PROPERTY:
                result.host = value
        if report.when == "call":
            if report.failed:
                result.outcome, result.message = "failed", _message(report)
            elif report.skipped:
                result.outcome, result.message = "skipped", _message(report)
        elif report.failed and result.outcome != "failed":
            result.outcome, result.message = "error", f"error in {report.when}: {_message(report)}"
        elif report.skipped and report.when == "setup":
            result.outcome, result.message = "skipped", _message(report)

    # -- results ------------------------------------------------------------------------------

    @property
    def fleet_hosts(self) -> tuple[str, ...]:
        """The hosts of a fleet run (several ``--host``), else empty."""
        options = self._options()
        return options.remote_urls if options is not None and options.fleet else ()

    def _options(self):
        """The run's options (None for a report built outside a pytest run, as the tests of the verdict do)."""
        from capture_conformance.harness.pytest_plugin.state import STATE

        stash = getattr(self.config, "stash", None)
        state = stash.get(STATE, None) if stash is not None else None
        return state.options if state is not None else None

    def results_of(self, host: str | None = None) -> list[CaseResult]:
        """One host's results (a fleet run), or the run's own: a single target's, or a fleet's parity area."""
        return [r for r in self.results.values() if r.host == host]

    @property
    def passed(self) -> bool:
        """The run's verdict, one definition for the JSON, the table and ``capture-conformance``'s exit status.

        A server that lacks fields or routes of protocol v1 is not v1-conformant, however clean the rest is.
        A fleet passes when every host does and the parity area does.
        """
        if self.fleet_hosts:
            from capture_conformance.harness.pytest_plugin.areas import FLEET_AREA

            parity = self.results_of(None)
            areas = self._options().areas
            parity_asked = not areas or FLEET_AREA in areas  # --area without parity: the hosts' verdicts alone
            # A host none of whose tests was selected (--area parity) is not run, not failed.
            return (all(self.passed_of(host) or not self.results_of(host) for host in self.fleet_hosts)
                    and self.exit_status in (0, None)
                    and (bool(parity) or not parity_asked) and all(r.outcome == "passed" for r in parity))
        return self.passed_of(None)

    def passed_of(self, host: str | None) -> bool:
        results = self.results_of(host)
        # In a fleet run, pytest's status 1 ("some test failed") may be another host's: a host's own verdict
        # reads its own results; an interrupted or broken session (2 and above) fails every host.
        fine = (0, 1, None) if self.fleet_hosts else (0, None)
        return summarize(results).passed and self.exit_status in fine and not missing_features(results)

    @property
    def summary(self) -> Summary:
        if self._summary is None:
            self._summary = summarize(self.results_of(None))
        return self._summary

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.exit_status = int(exitstatus)
        self._summary = None
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.fleet_hosts:
            from capture_conformance.harness.pytest_plugin.fleet_report import write_fleet

            write_fleet(self)
            return
        report = self.as_json()  # one dict, two renderings: the JSON and the HTML page
        (self.directory / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        write_html(report, self.directory)

    def as_json(self, host: str | None = None) -> dict[str, Any]:
        """The report of the run's target, or of one host of a fleet run."""
        from capture_conformance.harness.pytest_plugin.state import STATE, Target, host_facts, options_of

        options = options_of(self.config)
        state = self.config.stash.get(STATE, None)
        facts = host_facts(state.facts, host) if state else {}
        target = (Target(host, managed=False) if host else state.target) if state else None
        results = self.results_of(host)
        summary = summarize(results)
        passed = self.passed_of(host)
        return {
            "tool": "capture-conformance",
            "protocol": PROTOCOL_VERSION,
            "passed": passed,
            "capture_level": summary.capture_level,
            "profile": options.profile,
            "target": {
                "url": target.base_url if target else options.remote_url,
                "started_by_harness": bool(target.managed) if target else options.remote_url is None,
                "command": target.command if target else options.launch,
            },
            "model": facts.get("model", options.model),
            "dialect": facts.get("dialect", options.dialect),
            "ground_truth": facts.get("ground_truth"),
            "layout": facts.get("layout"),
            "values": _values_section(summary, facts),
            "runs_left_on_target": merge_cleanups([v for k, v in sorted(facts.items()) if k.startswith("cleanup:")]),
            "pytest_exit_status": self.exit_status,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "duration_s": round(time.time() - self.started, 2),
            "python": platform.python_version(),
            "snapshots": snapshot_summary(results),
            "diagnoses": group_causes(results, AREAS + OPTIONAL_AREAS),
            "missing_from_protocol_v1": missing_features(results),
            "areas": {name: {**asdict(area)} for name, area in summary.areas.items()},
            "tests": [asdict(r) for r in results],
        }

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.fleet_hosts:
            from capture_conformance.harness.pytest_plugin.fleet_report import fleet_lines

            lines = [line for host in self.fleet_hosts for line in self.table_lines(host)] + fleet_lines(self)
        else:
            lines = self.table_lines()
        for line in lines:
            terminalreporter.write_line(line)

    def table_lines(self, host: str | None = None) -> list[str]:
        results = self.results_of(host)
        summary = summarize(results)
        report = self.as_json(host)
        directory = self.host_directory(host)
        truth = report["ground_truth"] or {}
        lines = [
            "",
            f"capture-conformance: {report['target']['url'] or '(no target)'}  model {report['model']}  "
            f"profile {report['profile']}  dialect {report['dialect']}",
            f"ground truth: {truth.get('source', 'not established')}"
            + (f"  (from the server, not independent: {', '.join(truth['from_server'])})" if truth.get("from_server") else ""),
            _layout_line(report.get("layout")),
            f"{'area':<14}{'passed':>7}{'failed':>7}{'skipped':>8}  first failure",
        ]
        for name, area in summary.areas.items():
            failed = area.failed + area.errors
            first = ""
            if area.first_failure:
                first = f"{area.first_failure['test']}: {area.first_failure['message'].splitlines()[0][:110]}"
            else:
                skipped = [r for r in results if r.area == name and r.outcome == "skipped"]
                if skipped:
                    first = f"(skipped: {skipped[0].message.splitlines()[0][:100] if skipped[0].message else ''})"
            lines.append(f"{name:<14}{area.passed:>7}{failed:>7}{area.skipped:>8}  {first}")
        values = report.get("values") or {}
        status = str(values.get("status", "not run"))
        if status.startswith(NOT_VERIFIABLE):
            lines.append(f"{status[:200]}: shapes only")
        elif status != "not run":
            reference = values.get("reference") or {}
            where = (f"reference {reference.get('model')} on {reference.get('device')}, {reference.get('dtype')}"
                     if reference.get("available") else "no reference")
            lines.append(f"values: {status} ({where}; {values.get('tolerance')})")
        if report["diagnoses"]:
            lines.append("diagnoses (root causes, most basic first):")
            for entry in report["diagnoses"]:
                count = f"{entry['count']} test{'s' if entry['count'] != 1 else ''}"
                lines.append(f"  {count:>9}  {entry['cause'][:100]}  [{', '.join(entry['areas'])}]")
        for entry in report["missing_from_protocol_v1"]:
            lines.append(f"missing from protocol v1: {entry['feature']} ({entry['tests']} tests skipped): "
                         f"{entry['why'][:100]}")
        snaps = report["snapshots"]
        if snaps["recorded"] or snaps["updated"] or snaps["compared"]:
            parts = [f"{len(snaps[k])} {k}" for k in ("recorded", "updated", "compared") if snaps[k]]
            where = f" in {', '.join(snaps['dirs'])}" if snaps["dirs"] else ""
            lines.append(f"shape snapshots: {', '.join(parts)}{where}")
        cleanup = report.get("runs_left_on_target")
        if cleanup and cleanup["created"]:
            why = f" ({cleanup['why']})" if cleanup["why"] else ""
            lines.append(f"runs on the target: {cleanup['created']} created, {cleanup['deleted']} deleted, "
                         f"{cleanup['left']} left{why}")
        verdict = "PASSED" if report["passed"] else "FAILED"
        lines.append(f"capture level: {summary.capture_level}    profile {report['profile']}: {verdict}")
        lines.append(f"report: {directory / REPORT_FILE}  (page: {directory / HTML_FILE})")
        return lines

    def host_directory(self, host: str | None) -> Path:
        """Where a report goes: the run's directory, or ``hosts/<host>/`` under it for one host of a fleet."""
        if host is None:
            return self.directory
        from capture_conformance.harness.pytest_plugin.fleet_report import host_dir_name

        return self.directory / "hosts" / host_dir_name(host)


def _layout_line(layout: dict | None) -> str:
    if not layout:
        return "savepoints: not discovered"
    if "error" in layout:
        return f"savepoints: not discovered ({layout['error'][:150]})"
    roles = layout.get("selectors") or {}
    shown = ", ".join(f"{k} {v}" for k, v in roles.items() if v)
    return f"savepoints ({'independent' if layout.get('independent') else 'not independent'}): {shown}"


def _values_section(summary: Summary, facts: dict) -> dict:
    """The values area's verdict, its reference (model, device, dtype), tolerances and every comparison."""
    from capture_conformance.harness.protocol.values import CAPTURE_TOLERANCE, MODEL_TOLERANCE, SEPARATION

    comparisons = [value for key, value in sorted(facts.items()) if key.startswith("values:")
                   and isinstance(value, dict)]
    by_capture = {c.get("capture_dtype"): c.get("tolerance") for c in comparisons}
    model_dtypes = sorted({str(c.get("model_dtype")) for c in comparisons})
    overridden = any(c.get("tolerance_source") == "--value-tolerance" for c in comparisons)
    tolerance = (f"model dtype {'/'.join(model_dtypes)}: relative error <= "
                 + ", ".join(f"{tol:.3g} ({dtype} capture)" for dtype, tol in sorted(by_capture.items()))
                 + (" from --value-tolerance" if overridden else "")) if comparisons else (
        f"relative error per model dtype {MODEL_TOLERANCE} plus per capture dtype {CAPTURE_TOLERANCE}")
    return {
        "status": summary.values,
        "reference": facts.get("values_reference"),
        "tolerance": tolerance,
        "tolerances": {"model_dtype": MODEL_TOLERANCE, "capture_dtype": CAPTURE_TOLERANCE,
                       "separation": f"the right value must be {SEPARATION:g}x closer than any wrong candidate"},
        "comparisons": comparisons,
    }
