"""The fleet page: one report per host and the parity table, for a run with several ``--host``.

Layout of ``--conformance-report DIR`` in a fleet run:

- ``DIR/hosts/<host>/conformance-report.json`` (and ``.html``): each host's own
  report, the same document a single-host run writes;
- ``DIR/conformance-report.json``: the fleet's: ``"fleet": true``, one line per
  host (verdict, capture level, values, where its report is), the parity area's
  table (each pair's largest difference, each host's deviation and verdict) and
  the fleet verdict: every host passed and parity held;
- ``DIR/conformance-report.html``: the same as a page.
"""

from __future__ import annotations

import html
import json
import re
import time
from typing import Any

from capture_conformance.harness import PROTOCOL_VERSION
from capture_conformance.harness.pytest_plugin.html_report import HTML_FILE, write_html
from capture_conformance.harness.pytest_plugin.state import STATE

# The report plugin (report.ConformanceReport) calls in here for a fleet run and is passed in, never
# imported: report -> fleet_report is the only direction (import-linter: no cycles).

REPORT_FILE = "conformance-report.json"


def host_dir_name(url: str) -> str:
    """``http://127.0.0.1:8006`` -> ``127.0.0.1_8006``: a directory name per host."""
    bare = re.sub(r"^https?://", "", url).rstrip("/")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", bare) or "host"


def fleet_json(report: Any, own_reports: dict[str, dict] | None = None) -> dict[str, Any]:
    """The fleet's document; ``own_reports``: each host's ``as_json`` where the caller has built it already."""
    from dataclasses import asdict

    state = report.config.stash.get(STATE, None)
    parity = (state.facts.get("parity") if state else None) or {}
    hosts = []
    for url in report.fleet_hosts:
        own = (own_reports or {}).get(url) or report.as_json(url)
        ran = bool(own["tests"])  # --area parity runs none of a host's own tests: "not run", never failed
        hosts.append({"url": url, "passed": own["passed"] if ran else None,
                      "capture_level": own["capture_level"] if ran else "not run",
                      "values": (own.get("values") or {}).get("status"), "model": own.get("model"),
                      "failed": sum(1 for t in own["tests"] if t["outcome"] in ("failed", "error")),
                      "report": f"hosts/{host_dir_name(url)}/{REPORT_FILE}"})
    parity_tests = [asdict(r) for r in report.results_of(None)]  # the fleet's own tests: the parity area
    return {
        "tool": "capture-conformance",
        "protocol": PROTOCOL_VERSION,
        "fleet": True,
        "passed": report.passed,
        "hosts": hosts,
        "parity": {"passed": all(t["outcome"] == "passed" for t in parity_tests) if parity_tests else None,
                   "table": parity, "tests": parity_tests},
        "pytest_exit_status": report.exit_status,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_fleet(report: Any) -> None:
    owns = {}
    for url in report.fleet_hosts:
        directory = report.host_directory(url)
        directory.mkdir(parents=True, exist_ok=True)
        owns[url] = own = report.as_json(url)
        (directory / REPORT_FILE).write_text(json.dumps(own, indent=2) + "\n")
        write_html(own, directory)
    fleet = fleet_json(report, owns)
    (report.directory / REPORT_FILE).write_text(json.dumps(fleet, indent=2) + "\n")
    (report.directory / HTML_FILE).write_text(render_fleet_html(fleet))


def fleet_lines(report: Any) -> list[str]:
    fleet = fleet_json(report)
    lines = ["", f"capture-conformance fleet: {len(fleet['hosts'])} hosts"]
    for host in fleet["hosts"]:
        verdict = "NOT RUN" if host["passed"] is None else "PASSED" if host["passed"] else "FAILED"
        lines.append(f"  {verdict:<7} {host['url']:<32} level {host['capture_level']}"
                     f"  values {str(host['values'])[:40]}  ({host['report']})")
    table = fleet["parity"]["table"] or {}
    lines.append(f"parity ({table.get('measure', 'not run')}):")
    for verdict in table.get("verdicts", []):
        deviation = "n/a" if verdict["deviation"] is None else f"{verdict['deviation']:.3g}"
        lines.append(f"  {'ok' if verdict['ok'] else 'DISAGREES':<9} {verdict['url']:<32} median deviation "
                     f"{deviation} (tolerance {verdict['tolerance']:.3g})"
                     + (f": {verdict['why'][:160]}" if verdict["why"] else ""))
    if table.get("note"):
        lines.append(f"  {table['note']}")
    lines.append(f"fleet: {'PASSED' if fleet['passed'] else 'FAILED'}    report: {report.directory / REPORT_FILE}  "
                 f"(page: {report.directory / HTML_FILE})")
    return lines


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def render_fleet_html(fleet: dict[str, Any]) -> str:
    """A self-contained page (inline CSS, no scripts); everything from the servers escaped."""
    verdict = "PASSED" if fleet["passed"] else "FAILED"
    rows = "".join(
        f"<tr class='{'' if h['passed'] is not False else 'bad'}'><td>{_e(h['url'])}</td>"
        f"<td>{'not run' if h['passed'] is None else 'passed' if h['passed'] else 'FAILED'}"
        f"</td><td>{_e(h['capture_level'])}</td><td>{_e(h['values'])}</td><td class='n'>{h['failed']}</td>"
        f"<td><a href='{_e(h['report'].replace(REPORT_FILE, HTML_FILE))}'>report</a></td></tr>"
        for h in fleet["hosts"])
    table = fleet["parity"]["table"] or {}
    hosts = table.get("hosts", [])
    matrix = table.get("matrix", {})
    head = "".join(f"<th>{_e(h)}</th>" for h in hosts)
    cells = "".join(
        "<tr><th>" + _e(a) + "</th>" + "".join(
            "<td class='n'>" + ("—" if a == b else ("n/a" if matrix.get(a, {}).get(b) is None
                                                    else f"{matrix[a][b]:.3g}")) + "</td>" for b in hosts) + "</tr>"
        for a in hosts)
    verdicts = "".join(
        f"<tr class='{'' if v['ok'] else 'bad'}'><td>{_e(v['url'])}</td><td>{'ok' if v['ok'] else 'DISAGREES'}</td>"
        f"<td class='n'>{'n/a' if v['deviation'] is None else format(v['deviation'], '.3g')}</td>"
        f"<td class='n'>{v['tolerance']:.3g}</td><td>{_e(v['why'])}</td></tr>" for v in table.get("verdicts", []))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>capture-conformance fleet: {verdict}</title>
<style>body{{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px}}
table{{border-collapse:collapse;width:100%;margin:8px 0}}th,td{{border:1px solid #d0d7de;padding:4px 8px;text-align:left}}
th{{background:#f6f8fa}}td.n{{text-align:right;font-variant-numeric:tabular-nums}}tr.bad td{{background:#fff5f5}}
.pass{{color:#116329}}.fail{{color:#a40e26}}</style></head><body>
<h1>capture-conformance fleet: <span class="{'pass' if fleet['passed'] else 'fail'}">{verdict}</span></h1>
<p>protocol {_e(fleet['protocol'])}; {len(fleet['hosts'])} hosts; finished {_e(fleet['finished_at'])}</p>
<h2>Hosts</h2><table><tr><th>host</th><th>verdict</th><th>capture level</th><th>values</th><th>failed</th><th></th></tr>
{rows}</table>
<h2>Parity</h2><p>{_e(table.get('measure', 'not run'))}; cases {_e(', '.join(table.get('cases', [])))};
savepoints {_e(', '.join(table.get('savepoints', [])))}</p>
<table><tr><th>host</th><th>parity</th><th>median deviation</th><th>tolerance</th><th>why</th></tr>{verdicts}</table>
<h3>Largest difference between each pair</h3><table><tr><th></th>{head}</tr>{cells}</table>
<p>{_e(table.get('note', ''))}</p>
</body></html>
"""
