"""The conformance report as one self-contained HTML page (``harness/html_report.py``).

The rendering tests are pure and fast. One test runs ``capture-conformance``
against the older-family server and checks that the page is written next to the
JSON from the same data; when Chromium is installed at ``/usr/bin/chromium`` it
also screenshots that page headless (the tests never install it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path


from capture_conformance.harness.pytest_plugin.html_report import HTML_FILE, main as html_main, render_html
from capture_conformance.harness.pytest_plugin.report import REPORT_FILE, CaseResult, summarize

from conftest import inner_pytest_env

CHROMIUM = Path("/usr/bin/chromium")
LEGACY_SERVER = Path(__file__).with_name("legacy_server.py")
LEGACY_LAUNCH = f"python {LEGACY_SERVER} --port {{port}} --storage-dir {{storage_dir}}"
EVIL = 'savepoint "<script>alert(1)</script>" & <b>bold</b> missing'


def synthetic_report() -> dict:
    """A report shaped exactly like ConformanceReport.as_json's, from the same summarize()."""
    results = [
        CaseResult("suites/test_health.py::test_health_ok", "health", "passed", 0.1),
        CaseResult("suites/test_chat.py::test_chat_basic", "chat", "passed", 0.2),
        CaseResult("suites/test_chat.py::test_prompt_tokens", "chat", "skipped", 0.0,
                   "no local tokenizer for model 'remote-model': cannot verify usage.prompt_tokens"),
        CaseResult("suites/test_single_token.py::test_last_logits", "single_token", "passed", 0.3),
        CaseResult("suites/test_multi_token.py::test_all_steps[5]", "multi_token", "failed", 0.4,
                   "single-token capture only: `_logits` is [1,1,V] for 5 generated tokens\nsecond line"),
        CaseResult("suites/test_multi_token.py::test_greedy[2]", "multi_token", "passed", 0.4),
        CaseResult("suites/test_savepoints.py::test_layer_outputs", "savepoints", "failed", 0.5, EVIL),
        CaseResult("suites/test_savepoints.py::test_widths", "savepoints", "error", 0.1,
                   "error in setup: ConnectionError: refused"),
    ]
    summary = summarize(results)
    return {
        "tool": "capture-conformance",
        "protocol": "1",
        "passed": summary.passed,
        "capture_level": summary.capture_level,
        "profile": "core",
        "target": {"url": "http://gpu-box:8006", "started_by_harness": False, "command": None},
        "model": "Qwen/Qwen3-0.6B<x>",
        "ground_truth": {"vocab_size": 151936, "hidden_size": 1024, "num_layers": 28,
                         "source": "--expect-vocab/--expect-hidden", "independent": True,
                         "tokenizer": "not available (light install)"},
        "pytest_exit_status": 1,
        "started_at": "2026-01-02T03:04:05Z",
        "duration_s": 12.5,
        "python": "3.11.7",
        "areas": {name: {"passed": a.passed, "failed": a.failed, "errors": a.errors, "skipped": a.skipped,
                         "first_failure": a.first_failure} for name, a in summary.areas.items()},
        "tests": [r.__dict__ for r in results],
    }


class _Page(HTMLParser):
    """Tags, the area table's rows (cell texts) and the <pre> texts of a page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.rows: list[list[str]] = []
        self.pres: list[str] = []
        self.h3: list[str] = []
        self.title = ""
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        self._in.append(tag)
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag in ("pre", "h3", "title"):
            self._cell = []

    def handle_endtag(self, tag):
        if self._in and self._in[-1] == tag:
            self._in.pop()
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag in ("pre", "h3", "title") and self._cell is not None:
            text = "".join(self._cell)
            {"pre": self.pres, "h3": self.h3}.get(tag, []).append(text)
            if tag == "title":
                self.title = text
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def test_the_page_has_the_title_facts_verdict_and_level():
    page = render_html(synthetic_report())
    parsed = parse(page)
    assert page.startswith("<!DOCTYPE html>")
    assert "capture-conformance: http://gpu-box:8006" in page
    assert parsed.title == "capture-conformance FAILED: http://gpu-box:8006"
    assert "profile core: FAILED" in page
    assert "capture level: <strong>single-token</strong>" in page
    assert "2026-01-02T03:04:05Z" in page
    assert "Qwen/Qwen3-0.6B&lt;x&gt;" in page  # the model name is escaped too
    assert "--expect-vocab/--expect-hidden" in page


def test_the_area_table_has_one_row_per_area_with_counts_and_first_failure():
    parsed = parse(render_html(synthetic_report()))
    rows = {row[0]: row[1:] for row in parsed.rows if len(row) == 5}
    assert list(rows)[:1] == ["area"]
    assert rows["health"] == ["1", "0", "0", ""]
    assert rows["chat"][:3] == ["1", "0", "1"]
    assert rows["chat"][3].startswith("(skipped: no local tokenizer for model 'remote-model'")
    assert rows["single_token"] == ["1", "0", "0", ""]
    # only the first line of the first failure goes into the table
    assert rows["multi_token"] == ["1", "1", "0", "test_all_steps[5]: single-token capture only: `_logits` is "
                                                  "[1,1,V] for 5 generated tokens"]
    # failed + errors are one column, as in the terminal table
    assert rows["savepoints"][:3] == ["0", "2", "0"]
    assert rows["savepoints"][3] == f"test_layer_outputs: {EVIL}"
    assert rows["total"] == ["4", "3", "1", ""]
    area_rows = [name for name in rows if name not in ("area", "total")]
    assert area_rows == ["health", "chat", "single_token", "multi_token", "savepoints"]


def test_every_failure_is_listed_with_its_test_id_and_full_message_in_a_pre():
    parsed = parse(render_html(synthetic_report()))
    assert "Failures (3)" in render_html(synthetic_report())
    assert parsed.h3 == [
        "failed suites/test_multi_token.py::test_all_steps[5]",
        "failed suites/test_savepoints.py::test_layer_outputs",
        "error suites/test_savepoints.py::test_widths",
    ]
    assert parsed.pres == [
        "single-token capture only: `_logits` is [1,1,V] for 5 generated tokens\nsecond line",
        EVIL,
        "error in setup: ConnectionError: refused",
    ]


def test_untrusted_text_is_escaped_and_the_page_fetches_nothing():
    report = synthetic_report()
    report["target"]["url"] = 'http://x"><script>alert(2)</script>'
    page = render_html(report)
    parsed = parse(page)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "script" not in parsed.tags and "b" not in parsed.tags
    # self-contained: no scripts, links, images, frames or remote URLs in attributes
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(parsed.tags)
    assert not any(v and re.match(r"(https?:|//|file:)", v) for _, v in parsed.attrs), parsed.attrs
    assert "url(" not in page and "@import" not in page


def test_a_passing_report_says_passed_and_lists_no_failures():
    report = synthetic_report()
    report["tests"] = [t for t in report["tests"] if t["outcome"] == "passed"]
    summary = summarize([CaseResult(**t) for t in report["tests"]])
    report.update(passed=summary.passed, capture_level=summary.capture_level, pytest_exit_status=0,
                  areas={n: a.__dict__ for n, a in summary.areas.items()})
    page = render_html(report)
    assert "profile core: PASSED" in page and 'class="verdict pass"' in page
    assert "Failures (0)" in page and "<pre>" not in page


def test_an_empty_or_minimal_report_still_renders():
    page = render_html({"passed": False})
    assert "no conformance test ran" in page and "(no target)" in page and "FAILED" in page


def test_a_saved_json_report_can_be_re_rendered(tmp_path, capsys):
    source = tmp_path / REPORT_FILE
    source.write_text(json.dumps(synthetic_report()))
    assert html_main([str(source)]) == 0
    assert (tmp_path / HTML_FILE).read_text() == render_html(synthetic_report())


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _env() -> dict:
    return inner_pytest_env()


def test_capture_conformance_writes_the_page_next_to_the_json_from_the_same_data(tmp_path):
    report_dir = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "capture_conformance.harness.pytest_plugin.cli", "--launch", LEGACY_LAUNCH, "--profile", "smoke",
         "--report-dir", str(report_dir)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env=_env())
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((report_dir / REPORT_FILE).read_text())
    page = (report_dir / HTML_FILE).read_text()
    assert page == render_html(report)  # one source of truth
    assert f"(page: {report_dir / HTML_FILE})" in result.stdout
    parsed = parse(page)
    rows = {row[0]: row[1:] for row in parsed.rows if len(row) == 5}
    for name, area in report["areas"].items():
        assert rows[name][:3] == [str(area["passed"]), str(area["failed"] + area["errors"]), str(area["skipped"])]
    assert rows["multi_token"][3].startswith(report["areas"]["multi_token"]["first_failure"]["test"] + ": "
                                             "single-token capture only: `_logits` is [1,1,V]"), rows
    failed = [t["nodeid"] for t in report["tests"] if t["outcome"] in ("failed", "error")]
    assert failed and all(any(h.endswith(nodeid) for h in parsed.h3) for nodeid in failed), (failed, parsed.h3)
    assert "capture level: <strong>single-token</strong>" in page

    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return  # the screenshot needs Chromium; tests never install it (apt-get install -y chromium)
    shot = tmp_path / "report.png"
    profile = tmp_path / "chromium-profile"
    run = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,900",
         (report_dir / HTML_FILE).as_uri()],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stdout + run.stderr
    assert _png_size(shot) == (1200, 900)
    # a blank page compresses to a few KB; a rendered report with text and tables is far larger
    assert shot.stat().st_size > 20_000, shot.stat().st_size
    shutil.rmtree(profile, ignore_errors=True)
