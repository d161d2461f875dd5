"""The conformance report as one self-contained HTML page: ``conformance-report.html``.

Rendered from the very dict that is written as ``conformance-report.json``
(``ConformanceReport.as_json``), so the page and the JSON cannot disagree. The
page has inline CSS only: no scripts, fonts, images or links to fetch, so it
opens the same from a CI artifact, a mail attachment or a file:// URL.

Everything that came from the server under test or from pytest (URL, model,
messages, test ids) is untrusted and escaped.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Any

HTML_FILE = "conformance-report.html"

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 24px auto; max-width: 1100px; padding: 0 16px; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
h3 { font-size: 13px; margin: 14px 0 4px; font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
     word-break: break-all; }
.verdict { display: inline-block; padding: 6px 14px; border-radius: 6px; font-weight: 700; font-size: 16px;
           margin: 10px 12px 10px 0; }
.pass { background: #dafbe1; color: #116329; border: 1px solid #4ac26b; }
.fail { background: #ffebe9; color: #a40e26; border: 1px solid #ff8182; }
.level { font-size: 15px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0; }
dl.facts dt { color: #59636e; }
dl.facts dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; width: 4.5em; }
tr.bad td { background: #fff5f5; }
tr.bad td.n.f { color: #a40e26; font-weight: 700; }
tr.skip td.n.s { color: #9a6700; font-weight: 700; }
td.reason { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; word-break: break-word; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 10px; margin: 0 0 8px;
      white-space: pre-wrap; word-break: break-word; font-size: 12px; }
.outcome { font-size: 11px; font-weight: 700; text-transform: uppercase; padding: 1px 6px; border-radius: 4px;
           margin-right: 6px; font-family: system-ui, sans-serif; }
.outcome.failed, .outcome.error { background: #ffebe9; color: #a40e26; }
.outcome.skipped { background: #fff8c5; color: #9a6700; }
.muted { color: #59636e; }
footer { margin-top: 28px; color: #59636e; font-size: 12px; }
"""

_REASON_CHARS = 160


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _first_line(text: str, limit: int = _REASON_CHARS) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _test_name(nodeid: str) -> str:
    return nodeid.split("::", 1)[-1]


def render_html(report: dict[str, Any]) -> str:
    """The HTML page for one report dict (the content of ``conformance-report.json``)."""
    target = report.get("target") or {}
    truth = report.get("ground_truth") or {}
    areas: dict[str, dict[str, Any]] = report.get("areas") or {}
    tests: list[dict[str, Any]] = report.get("tests") or []
    passed = bool(report.get("passed"))
    url = target.get("url") or "(no target)"
    profile = report.get("profile", "?")
    verdict = "PASSED" if passed else "FAILED"

    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>capture-conformance {verdict}: {_e(url)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>capture-conformance: {_e(url)}</h1>",
        f'<div><span class="verdict {"pass" if passed else "fail"}">profile {_e(profile)}: {verdict}</span>'
        f'<span class="level">capture level: <strong>{_e(report.get("capture_level", "none"))}</strong></span></div>',
        '<dl class="facts">',
    ]
    facts = [
        ("target", url + ("  (started by the harness)" if target.get("started_by_harness") else "")),
        ("model", report.get("model")),
        ("dialect", report.get("dialect")),
        ("profile", profile),
        ("date", report.get("started_at")),
        ("duration", f"{report['duration_s']} s" if report.get("duration_s") is not None else None),
        ("ground truth", truth.get("source", "not established")),
        ("sizes", ", ".join(f"{k} {truth[k]}" for k in ("vocab_size", "hidden_size", "num_layers") if k in truth)),
        ("number sources", ", ".join(f"{k}: {v}" for k, v in (truth.get("sources") or {}).items())),
        ("savepoints", ", ".join(f"{k} {v}" for k, v in ((report.get("layout") or {}).get("selectors") or {}).items()
                                 if v) or (report.get("layout") or {}).get("error")),
        ("tokenizer", truth.get("tokenizer")),
        ("server command", target.get("command")),
        ("protocol", report.get("protocol")),
        ("pytest exit status", report.get("pytest_exit_status")),
    ]
    for name, value in facts:
        if value not in (None, ""):
            out.append(f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>")
    out.append("</dl>")

    # -- the per-area table -------------------------------------------------------------------
    out += [
        "<h2>Areas</h2>",
        '<table class="areas"><thead><tr><th>area</th><th>passed</th><th>failed</th><th>skipped</th>'
        "<th>first failure</th></tr></thead><tbody>",
    ]
    for name, area in areas.items():
        failed = int(area.get("failed", 0)) + int(area.get("errors", 0))
        skipped = int(area.get("skipped", 0))
        first = area.get("first_failure")
        if first:
            reason = f"{_e(first.get('test'))}: {_e(_first_line(first.get('message', '')))}"
        elif skipped:
            skip = next((t for t in tests if t.get("area") == name and t.get("outcome") == "skipped"), None)
            reason = f'<span class="muted">(skipped: {_e(_first_line(skip.get("message", "")) if skip else "")})</span>'
        else:
            reason = ""
        css = "bad" if failed else ("skip" if skipped else "ok")
        out.append(
            f'<tr class="{css}"><td>{_e(name)}</td><td class="n p">{int(area.get("passed", 0))}</td>'
            f'<td class="n f">{failed}</td><td class="n s">{skipped}</td><td class="reason">{reason}</td></tr>'
        )
    if not areas:
        out.append('<tr><td colspan="5" class="muted">no conformance test ran</td></tr>')
    totals = {k: sum(int(a.get(k, 0)) for a in areas.values()) for k in ("passed", "failed", "errors", "skipped")}
    out.append(
        f'<tr><th>total</th><th class="n">{totals["passed"]}</th><th class="n">{totals["failed"] + totals["errors"]}'
        f'</th><th class="n">{totals["skipped"]}</th><th></th></tr>'
    )
    out.append("</tbody></table>")

    # -- root causes, most basic first ---------------------------------------------------------
    diagnoses = report.get("diagnoses") or []
    if diagnoses:
        out.append("<h2>Diagnoses (root causes, most basic first)</h2>")
        out.append('<table class="diagnoses"><thead><tr><th>tests</th><th>cause</th><th>areas</th>'
                   "<th>example</th></tr></thead><tbody>")
        for entry in diagnoses:
            out.append(f'<tr class="bad"><td class="n f">{int(entry.get("count", 0))}</td>'
                       f'<td class="reason">{_e(entry.get("cause"))}</td><td>{_e(", ".join(entry.get("areas", [])))}'
                       f'</td><td class="reason">{_e(_first_line(entry.get("example", "")))}</td></tr>')
        out.append("</tbody></table>")
    missing = report.get("missing_from_protocol_v1") or []
    if missing:
        out.append("<h2>Missing from protocol v1</h2><ul>")
        for entry in missing:
            out.append(f"<li>{_e(entry.get('feature'))}: {_e(entry.get('why'))} "
                       f"({int(entry.get('tests', 0))} tests skipped)</li>")
        out.append("</ul>")
    snaps = report.get("snapshots") or {}
    if any(snaps.get(k) for k in ("recorded", "updated", "compared")):
        parts = ", ".join(f"{len(snaps[k])} {k}" for k in ("recorded", "updated", "compared") if snaps.get(k))
        where = f" in {', '.join(snaps.get('dirs') or [])}" if snaps.get("dirs") else ""
        out.append(f"<p>Shape snapshots: {_e(parts + where)}</p>")

    # -- every failure, then every skip -------------------------------------------------------
    order = {name: i for i, name in enumerate(areas)}  # failures grouped as the table lists the areas
    failures = sorted((t for t in tests if t.get("outcome") in ("failed", "error")),
                      key=lambda t: order.get(t.get("area"), len(order)))
    out.append(f"<h2>Failures ({len(failures)})</h2>")
    if not failures:
        out.append('<p class="muted">none</p>')
    for test in failures:
        out.append(
            f'<h3 id="{_e(test.get("nodeid"))}"><span class="outcome {_e(test.get("outcome"))}">'
            f'{_e(test.get("outcome"))}</span> {_e(test.get("nodeid"))}</h3>'
            f'<pre>{_e(test.get("message") or "(no message)")}</pre>'
        )
    skips = [t for t in tests if t.get("outcome") == "skipped"]
    if skips:
        out.append(f"<h2>Skipped ({len(skips)})</h2>")
        out.append('<table class="skips"><thead><tr><th>test</th><th>reason</th></tr></thead><tbody>')
        for test in skips:
            out.append(f'<tr><td class="reason">{_e(test.get("nodeid"))}</td>'
                       f'<td class="reason">{_e(test.get("message"))}</td></tr>')
        out.append("</tbody></table>")

    out.append(
        f"<footer>{_e(report.get('tool', 'capture-conformance'))}, protocol {_e(report.get('protocol'))}, "
        f"python {_e(report.get('python'))}. The same data is in conformance-report.json; the full failure "
        "texts are in conformance.junit.xml.</footer>"
    )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html(report: dict[str, Any], directory: Path | str) -> Path:
    path = Path(directory) / HTML_FILE
    path.write_text(render_html(report), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m capture_conformance.harness.pytest_plugin.html_report REPORT.json [OUT.html]``: re-render a saved report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m capture_conformance.harness.pytest_plugin.html_report conformance-report.json [out.html]")
        return 0 if argv else 2
    source = Path(argv[0])
    target = Path(argv[1]) if len(argv) > 1 else source.with_name(HTML_FILE)
    target.write_text(render_html(json.loads(source.read_text())), encoding="utf-8")
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
