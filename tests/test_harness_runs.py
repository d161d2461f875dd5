"""The harness end to end: real pytest runs (subprocesses) against scripted, legacy and bundled servers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from capture_conformance.harness.pytest_plugin.plugin import SUITES_DIR
from legacy_server import ScriptedServer, healthy_routes

from conftest import inner_pytest_env

LEGACY_SERVER = Path(__file__).with_name("legacy_server.py")
LEGACY_LAUNCH = f"python {LEGACY_SERVER} --port {{port}} --storage-dir {{storage_dir}}"


def _env() -> dict:
    # These runs test how the plugin is found (its pytest11 entry point): autoloading stays on.
    return inner_pytest_env(lean=False)


def run(argv: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())


def run_pytest(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd, timeout)


def junit_failures(path: Path) -> dict[str, str]:
    """Test name -> failure (or error) message."""
    failures = {}
    for case in ET.parse(path).iter("testcase"):
        for problem in list(case.findall("failure")) + list(case.findall("error")):
            failures[case.get("name")] = (problem.get("message") or "") + "\n" + (problem.text or "")
    return failures


def junit_passed(path: Path) -> set[str]:
    return {c.get("name") for c in ET.parse(path).iter("testcase")
            if not c.findall("failure") and not c.findall("error") and not c.findall("skipped")}


def _closed_port() -> int:
    with ScriptedServer({}) as server:
        return server.port


# -- target checks: one line, before any test ---------------------------------------------------------


def test_an_unreachable_host_stops_the_run_with_one_clear_line(tmp_path):
    port = _closed_port()
    result = run_pytest("--host", "127.0.0.1", "--port", str(port), cwd=tmp_path, timeout=60)
    assert result.returncode == 4, result.stdout + result.stderr
    output = (result.stdout + result.stderr).strip()
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines == [f"ERROR: capture-conformance: http://127.0.0.1:{port} is unreachable: "
                     f"GET /health: cannot reach http://127.0.0.1:{port}: connection refused"], output


def test_a_proxy_splash_page_is_not_a_capture_server(tmp_path):
    page = b"<html><body>It works!</body></html>"
    with ScriptedServer({("GET", "/health"): lambda r: r.reply(200, raw=page, ctype="text/html")}) as server:
        result = run_pytest("--host", "127.0.0.1", "--port", str(server.port), cwd=tmp_path, timeout=60)
    assert result.returncode == 4, result.stdout + result.stderr
    assert (f"ERROR: capture-conformance: {server.url} is not a capture server: GET /health answered 200 "
            f"text/html") in result.stderr, result.stderr


def _keyed_routes(key: str) -> dict:
    """A capture server whose /health is open and everything else wants ``Bearer key``, as the protocol allows."""
    def guarded(reply):
        def handler(r):
            if r.headers.get("Authorization") != f"Bearer {key}":
                return r.reply(401, {"detail": "unauthorized"})
            return reply(r)
        return handler

    routes = healthy_routes()
    return {("GET", "/health"): routes[("GET", "/health")],
            ("GET", "/v1/models"): guarded(routes[("GET", "/v1/models")]),
            ("POST", "/v1/chat/completions"): guarded(lambda r: r.reply(422, {"detail": "messages: missing"}))}


def test_a_keyed_server_tested_without_a_key_stops_with_one_line_and_status_77(tmp_path):
    with ScriptedServer(_keyed_routes("sesame")) as server:
        result = run_pytest("--host", "127.0.0.1", "--port", str(server.port), cwd=tmp_path, timeout=60)
        cli = run([str(Path(sys.executable).with_name("capture-conformance")), "--host", "127.0.0.1",
                   "--port", str(server.port), "--report-dir", str(tmp_path / "reports")], tmp_path, timeout=60)
    assert result.returncode == 77, result.stdout + result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines == ["Exit: capture-conformance: the server wants a key: pass --api-key or $CAPTURE_API_KEY "
                     "(GET /v1/models answered 401)"], lines
    assert "passed" not in result.stdout and "failed" not in result.stdout  # no test ran
    assert cli.returncode == 77, cli.stdout + cli.stderr
    assert [l for l in cli.stderr.splitlines() if l.strip()] == [lines[0]], cli.stderr


def test_a_wrong_key_is_named_as_refused(tmp_path):
    with ScriptedServer(_keyed_routes("sesame")) as server:
        result = run_pytest("--host", "127.0.0.1", "--port", str(server.port), "--api-key", "guess",
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 77, result.stdout + result.stderr
    assert "refused the key given (--api-key or $CAPTURE_API_KEY)" in result.stderr, result.stderr


def test_the_right_key_passes_the_key_probe():
    from capture_conformance.harness.protocol.probe import probe_key

    with ScriptedServer(_keyed_routes("sesame")) as server:
        assert probe_key(server.url, "sesame") is None
        assert "wants a key" in probe_key(server.url, None)


# -- collection: the installed suites from anywhere, profiles, inertness -----------------------------


def _collected(output: str) -> set[str]:
    return {line.strip() for line in output.splitlines() if "::" in line and not line.startswith(("ERROR", "FAILED"))}


def test_host_without_paths_runs_the_installed_suites_from_any_directory(tmp_path):
    result = run_pytest("--host", "127.0.0.1", "--port", "8006", "--collect-only", "-q", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    collected = _collected(result.stdout)
    files = {re.sub(r"::.*", "", item).rsplit("/", 1)[-1] for item in collected}
    assert files == {f"test_{a}.py" for a in ("health", "models", "chat", "single_token", "multi_token",
                                               "savepoints", "dtype_size", "out_of_order", "bad_input",
                                               "values", "streaming", "positions", "batch_invariance")}, files
    # A remote target cannot show its own start-up, so those tests are deselected, not failed or skipped.
    assert not any("test_health_is_503_loading" in item for item in collected)


def test_host_inside_the_clone_runs_only_the_suites():
    """The clone's own testpaths (its tests and the suites) are not what a --host run asks for: the suites only."""
    clone = SUITES_DIR.parent
    # Collection imports the suites' dependencies: allow for a loaded machine (make test runs this under -n 2).
    result = run_pytest("--host", "127.0.0.1", "--port", "8006", "--collect-only", "-q", cwd=clone, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    collected = _collected(result.stdout)
    paths = {re.sub(r"::.*", "", item) for item in collected}
    assert paths and all(path.startswith("suites/test_") for path in paths), sorted(paths)[:5]
    assert "suites/test_health.py" in paths and "suites/test_batch_invariance.py" in paths, sorted(paths)
    # Paths given keep their meaning: the clone's own tests, named, are collected with a target option too.
    named = run_pytest("--host", "127.0.0.1", "--port", "8006", "--collect-only", "-q", "tests/test_diagnoses.py",
                       cwd=clone, timeout=180)
    assert named.returncode == 0, named.stdout + named.stderr
    assert {re.sub(r"::.*", "", item) for item in _collected(named.stdout)} == {"tests/test_diagnoses.py"}, named.stdout


def test_profiles_are_nested(tmp_path):
    counts, listed = {}, {}
    for profile in ("smoke", "core", "full"):
        result = run_pytest(str(SUITES_DIR), "--profile", profile, "--collect-only", "-q", cwd=tmp_path, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        counts[profile] = _collected(result.stdout)
        listed[profile] = [line.strip() for line in result.stdout.splitlines() if "::" in line]
    assert counts["smoke"] < counts["core"] < counts["full"], {k: len(v) for k, v in counts.items()}
    # Health first, then the areas in their listed order (a server that is not up fails there first).
    from capture_conformance.harness.pytest_plugin.areas import AREAS

    modules = list(dict.fromkeys(node.split("::")[0].rsplit("/", 1)[-1] for node in listed["core"]))
    area_of = {p.name: re.search(r'pytest\.mark\.area\("(\w+)"\)', p.read_text()).group(1)
               for p in SUITES_DIR.glob("test_*.py")}
    ranks = [[a.name for a in AREAS].index(area_of[m]) for m in modules]
    assert modules[0] == "test_health.py" and ranks == sorted(ranks), modules


def test_the_plugin_is_inert_in_unrelated_runs(tmp_path):
    (tmp_path / "test_unrelated.py").write_text(
        "def test_no_conformance_fixtures(request):\n"
        "    assert 'capture_client' not in request.fixturenames\n\n"
        "def test_asking_for_one(capture_client):\n"
        "    pass\n"
    )
    result = run_pytest("-q", "-rE", cwd=tmp_path, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 1 error" in result.stdout, result.stdout
    assert "fixture 'capture_client' not found" in result.stdout, result.stdout
    assert "capture-conformance" not in result.stdout, result.stdout


# -- readable failures ------------------------------------------------------------------------------


def _chat_route(mode: str):
    def handler(r):
        r.body()
        if mode == "html":
            return r.reply(200, raw=b"<!DOCTYPE html><title>Bad Gateway</title>", ctype="text/html")
        if mode == "truncated":
            return r.reply(200, raw=b'{"id": "chatcmpl-1", "object": "chat.comp', ctype="application/json")
        if mode == "text":
            return r.reply(200, raw=b'{"id": "chatcmpl-1"}', ctype="text/plain")
        if mode == "incomplete":
            return r.reply(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "tiny-qwen3",
                                 "choices": []})
        import time

        time.sleep(5)  # hang

    return handler


GARBAGE = {
    "html": "POST /v1/chat/completions answered 200 text/html, not JSON: <!DOCTYPE html><title>Bad Gateway</title>",
    "truncated": "POST /v1/chat/completions answered 200 with invalid JSON",
    "text": "POST /v1/chat/completions answered 200 text/plain, not JSON",
    "incomplete": "chat response should have exactly one choice (n=1), has 0",
    "hang": "POST /v1/chat/completions got no answer within 1 s (--request-timeout)",
}


@pytest.mark.parametrize("mode", list(GARBAGE))
def test_garbage_answers_fail_the_test_with_a_readable_message(tmp_path, mode):
    routes = {**healthy_routes(), ("POST", "/v1/chat/completions"): _chat_route(mode)}
    junit = tmp_path / "junit.xml"
    with ScriptedServer(routes) as server:
        result = run_pytest(f"{SUITES_DIR}/test_chat.py::test_response_is_an_openai_chat_completion",
                            "--host", "127.0.0.1", "--port", str(server.port), "--request-timeout", "1",
                            f"--junitxml={junit}", cwd=tmp_path, timeout=90)
    assert result.returncode == 1, result.stdout + result.stderr
    (message,) = junit_failures(junit).values()
    assert GARBAGE[mode] in message, message
    for internal in ("JSONDecodeError", "KeyError", "TypeError", "IndexError", "INTERNALERROR"):
        assert internal not in result.stdout + result.stderr, result.stdout


# -- servers this run starts ------------------------------------------------------------------------------


def test_a_server_that_dies_on_start_fails_the_run_at_once_with_its_log(tmp_path):
    launch = "python -c \"import sys; print('model exploded: out of memory', flush=True); sys.exit(3)\" {port}"
    result = run_pytest(f"{SUITES_DIR}/test_health.py", "--launch", launch, cwd=tmp_path, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "capture server exited with code 3 before it was ready" in output, output
    assert "model exploded: out of memory" in output, output
    assert "passed" not in output.splitlines()[-1], output


def test_an_older_family_server_fails_multi_token_saying_it_captures_one_token(tmp_path):
    junit = tmp_path / "junit.xml"
    result = run_pytest(f"{SUITES_DIR}/test_multi_token.py", f"{SUITES_DIR}/test_health.py", "-rs", "--launch",
                        LEGACY_LAUNCH, f"--junitxml={junit}", cwd=tmp_path, timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    failures = junit_failures(junit)
    passed = junit_passed(junit)
    for steps in (2, 5, 16):
        message = failures[f"test_all_token_logits_have_one_step_per_generated_token[{steps}]"]
        assert f"single-token capture only: `_logits` is [1,1,V] for {steps} generated tokens" in message, message
    # What the old server does right still passes: one-token capture, its own ids, early EOS bookkeeping.
    assert "test_all_token_logits_have_one_step_per_generated_token[1]" in passed, failures
    assert "test_greedy_argmax_is_the_generated_token_at_every_step[1]" in passed, failures
    assert "test_health_is_ok_and_lists_the_model" in passed, failures
    # Detected as the older store_activations dialect: its missing v1 field is reported as missing, not failed.
    assert "test_health_reports_the_protocol_version" not in failures and "test_health_reports_the_protocol_version" \
        not in passed, failures
    assert "missing from protocol v1: /health 'protocol' (store_activations dialect)" in result.stdout + result.stderr


def test_cli_reports_the_legacy_server_failing_at_single_token_level(tmp_path):
    report_dir = tmp_path / "report"
    result = run([sys.executable, "-m", "capture_conformance.harness.pytest_plugin.cli", "--launch", LEGACY_LAUNCH, "--profile", "smoke",
                  "--report-dir", str(report_dir)], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((report_dir / "conformance-report.json").read_text())
    assert report["passed"] is False and report["capture_level"] == "single-token", report
    first = report["areas"]["multi_token"]["first_failure"]["message"]
    assert first.startswith("single-token capture only: `_logits` is [1,1,V] for 5 generated tokens"), first
    assert "capture level: single-token" in result.stdout, result.stdout
    assert report["dialect"] == "store_activations", report["dialect"]
    # the smoke tests asking for a `capture` object: one line in the summary, not failures
    assert [m["feature"] for m in report["missing_from_protocol_v1"]] == ["the 'capture' object"], report[
        "missing_from_protocol_v1"]
    assert "missing from protocol v1: the 'capture' object" in result.stdout, result.stdout


def test_cli_passes_the_bundled_server_under_xdist_and_writes_the_report(tmp_path):
    report_dir = tmp_path / "report"
    result = run([sys.executable, "-m", "capture_conformance.harness.pytest_plugin.cli", "--profile", "smoke", "--report-dir", str(report_dir),
                  "--", "-n", "2"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((report_dir / "conformance-report.json").read_text())
    assert report["passed"] is True, report
    assert report["capture_level"] == "savepoints", report  # smoke runs no dtype/out-of-order/bad-input tests
    assert report["model"] == "tiny-qwen3" and report["target"]["started_by_harness"] is True, report
    assert report["ground_truth"]["source"].startswith("model config"), report
    assert (report_dir / "conformance.junit.xml").is_file()
    table = result.stdout[result.stdout.index("capture-conformance: http://127.0.0.1:"):]
    assert re.search(r"multi_token\s+\d+\s+0\s+0", table), table
    assert "capture level: savepoints    profile smoke: PASSED" in table, table


def _stored_runs(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")) if store.exists() else []


@pytest.mark.parametrize("keep", [False, True], ids=["cleaned", "kept"])
def test_the_suites_leave_no_runs_on_the_target_unless_asked(tmp_path, keep):
    store = tmp_path / "store"
    report_dir = tmp_path / "report"
    launch = f"python -m capture_conformance.reference_server --port {{port}} --storage-dir {store}"
    result = run_pytest(str(SUITES_DIR / "test_single_token.py"), str(SUITES_DIR / "test_streaming.py"),
                        "--launch", launch, "--conformance-report", str(report_dir),
                        *(["--keep-runs"] if keep else []), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    cleanup = json.loads((report_dir / "conformance-report.json").read_text())["runs_left_on_target"]
    assert cleanup["created"] >= 5, cleanup
    if keep:
        assert cleanup["left"] == cleanup["created"] and "--keep-runs" in cleanup["why"], cleanup
        assert len(_stored_runs(store)) >= cleanup["created"], _stored_runs(store)
    else:
        assert cleanup == {"created": cleanup["created"], "deleted": cleanup["created"], "left": 0, "why": ""}
        assert _stored_runs(store) == [], "runs left on the target after the suites"
    assert f"runs on the target: {cleanup['created']} created" in result.stdout, result.stdout


# -- optional and keyed features -------------------------------------------------------------------------


def test_a_server_without_streaming_is_reported_as_such(tmp_path):
    result = run_pytest(str(SUITES_DIR / "test_streaming.py"), "-rs", "--launch", LEGACY_LAUNCH, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # 3 streaming tests skipped as "no streaming", the 4 streamed-vs-unstreamed comparisons as the older
    # family's missing `capture` object
    assert "7 skipped" in output, output
    assert "no streaming: asked with stream=true, POST /v1/chat/completions answered 200 (application/json)" in output, output


def test_the_api_key_checks_run_when_a_key_is_given(tmp_path):
    junit = tmp_path / "keyed.xml"
    result = run_pytest(str(SUITES_DIR / "test_health.py"), "--api-key", "s3cret", f"--junitxml={junit}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = junit_passed(junit)
    assert {"test_health_needs_no_api_key", "test_requests_without_the_api_key_are_401[/v1/models]"} <= passed, passed


def test_the_api_key_checks_fail_against_a_server_that_ignores_the_key(tmp_path):
    """The bundled server gets the key; a launched one that is not told about it must fail the 401 checks."""
    junit = tmp_path / "open.xml"
    result = run_pytest(str(SUITES_DIR / "test_health.py"), "--api-key", "s3cret", f"--junitxml={junit}",
                        "--launch", "python -m capture_conformance.reference_server --port {port} --storage-dir {storage_dir}", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    failures = junit_failures(junit)
    assert any("without the API key should be 401" in m for m in failures.values()), failures


def _strict_messages_route(r):
    """A server of the older family: `content` must be a string, roles system/user/assistant only."""
    body = json.loads(r.body())
    for index, message in enumerate(body["messages"]):
        if not isinstance(message.get("content"), str):
            return r.reply(422, {"detail": [{"loc": ["body", "messages", index, "content"],
                                             "msg": "Input should be a valid string"}]})
        if message.get("role") not in ("system", "user", "assistant"):
            return r.reply(422, {"detail": [{"loc": ["body", "messages", index, "role"],
                                             "msg": "Input should be 'system', 'user' or 'assistant'"}]})
    return r.reply(500, {"detail": "this scripted server only refuses"})


def test_a_server_without_the_newer_message_forms_is_reported_as_lacking_them(tmp_path):
    routes = {**healthy_routes(), ("POST", "/v1/chat/completions"): _strict_messages_route}
    with ScriptedServer(routes) as server:
        result = run_pytest(f"{SUITES_DIR}/test_chat.py", "-k", "list_of_text_parts or developer_role", "-rs",
                            "--host", "127.0.0.1", "--port", str(server.port), cwd=tmp_path, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "2 skipped" in output, output
    assert "no list-of-parts content: POST /v1/chat/completions answered 422" in output, output
    assert "no 'developer' role: POST /v1/chat/completions answered 422" in output, output
