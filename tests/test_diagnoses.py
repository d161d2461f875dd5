"""Failures grouped by root cause, most basic first; setup errors under their cause; missing features once."""

from __future__ import annotations

from capture_conformance.harness.pytest_plugin.diagnoses import classify, group, missing_features
from capture_conformance.harness.pytest_plugin.report import AREAS, CaseResult


def _r(area: str, outcome: str, message: str, name: str = "t") -> CaseResult:
    return CaseResult(f"suites/test_{area}.py::{name}", area, outcome, 0.0, message)


def test_known_defects_are_named_and_ranked_before_what_follows_from_them():
    results = [
        _r("bad_input", "failed", "greedy argmax of `_logits` differs from completion_token_ids at steps [0]", "a"),
        *[_r("multi_token", "error", "error in setup: single-token capture only: `_logits` is [1,1,V] for 5 "
             "generated tokens (x); expected [1,5,V]", f"m{i}") for i in range(3)],
        _r("savepoints", "failed", "single-token capture only: `layer_0` is [1,1,H] for 5 generated tokens", "s"),
        _r("chat", "failed", "max_tokens=3 was honoured (3 completion_token_ids), but usage counts a "
           "re-tokenisation of the reply: usage.completion_tokens is 5", "c"),
        _r("health", "failed", "/health does not list the model under test 'x': {...}", "h"),
        _r("chat", "skipped", "missing from protocol v1: /health 'protocol' (store_activations dialect)", "k1"),
        _r("health", "skipped", "missing from protocol v1: /health 'protocol' (store_activations dialect)", "k2"),
    ]
    causes = group(results, AREAS)
    names = [c["cause"] for c in causes]
    assert names[0].startswith("/health does not list the model under test"), names  # the most basic area
    assert names[1:4] == ["single-token capture only", "usage counts a re-tokenisation of the reply",
                         "captured logits do not produce the generated ids"], names
    first = causes[1]
    assert first["count"] == 4 and first["areas"] == ["multi_token", "savepoints"], first  # 3 setup errors + 1
    assert missing_features(results) == [
        {"feature": "/health 'protocol'", "why": "store_activations dialect", "tests": 2}]


def test_an_unknown_message_groups_with_its_twins_whatever_the_numbers_and_run_ids():
    a = classify("`x` has shape [1, 3, 7] = [1,3,7], expected [1, 3, 9] (run 0123456789abcdef0123)")
    b = classify("`x` has shape [1, 4, 7] = [1,4,7], expected [1, 4, 9] (run fedcba9876543210fedc)")
    assert a == b and a[0] == 100, (a, b)
    assert classify("expected 200; POST /v1/chat/completions answered 500 (application/json): {}")[1] == (
        "POST /v1/chat/completions answers 500 (a server error)")
    assert classify("expected 400 or 422; POST /v1/chat/completions answered 500 (application/json): {}")[1] == (
        "a client mistake is answered 500, not 4xx")


def test_missing_v1_features_fail_the_verdict_of_the_json_and_of_the_cli_alike(tmp_path):
    from types import SimpleNamespace

    from capture_conformance.harness.pytest_plugin.cli import Verdict
    from capture_conformance.harness.pytest_plugin.report import REPORT_PLUGIN, ConformanceReport

    report = ConformanceReport(SimpleNamespace(getoption=lambda name: str(tmp_path)))
    report.results = {r.nodeid: r for r in (
        _r("health", "passed", "", "ok"),
        _r("models", "skipped", "missing from protocol v1: POST /models/load (answered 404 'Not Found')", "load"))}
    report.exit_status = 0
    assert report.summary.passed, "every test that ran passed: the per-area summary is clean"
    assert report.passed is False, "a server without a v1 route is not v1-conformant"
    verdict = Verdict()
    plugins = SimpleNamespace(get_plugin=lambda name: report if name == REPORT_PLUGIN else None)
    verdict.pytest_unconfigure(SimpleNamespace(pluginmanager=plugins))
    assert verdict.passed is False, "capture-conformance must exit non-zero where the JSON says not passed"


def test_a_truncated_file_and_the_self_comparisons_are_named():
    # expect_tensor_matches_meta's wording for a file cut to 128 features under full-width metadata
    truncated = ("metadata and file disagree: `_logits`: the stored tensor is [1, 5, 128], metadata says [1, 5, 747]; "
                 "the file's last dimension is truncated to 128 of 747")
    assert classify(truncated)[1] == "truncated file: the stored tensor keeps fewer features than its metadata says"
    other = "metadata and file disagree: `_logits`: the stored tensor is torch.bfloat16, metadata says torch.float32"
    assert classify(other)[1] == "metadata and file disagree"
    assert classify("streamed capture differs from the unstreamed run of the same request (generated positions, "
                    "tokens all, 5 tokens): `head` (lm_head): steps [0, 1] of 5 differ")[1] == (
        "streamed captures differ from the same request unstreamed")
    assert classify("batched capture differs from its solo run (within the dtype's rounding): short prompt: ...")[1] == (
        "batch invariance broken: a capture depends on the requests batched with it")
    assert classify("prompt capture shortened or changed when the same prompt is sent again (a prefix cache must "
                    "not shorten prompt captures): 2nd in a row: `first` holds [1, 3, 64]")[1].startswith(
        "a repeated prompt's capture is shortened")
