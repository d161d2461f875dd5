"""Area bad_input: every client mistake of the protocol gets its 4xx, and the server carries on.

Each case checks the status, the ``{"detail": ...}`` body without a traceback,
that the detail names the culprit where the protocol says so, and then that
``/health`` is still 200 and the simplest request the server served before
(a one-token chat without capture) is served again.

The area needs only a server that answers: no case waits for a successful
capture except the two about the files of a real run. A case about a route
the server does not have is skipped as missing from protocol v1 (reported
once), never passed on the framework's 404.

Selectors in the cases are templates over the model's discovered layout
(``{head}``, ``{block0}``, ``{blocks}``): an out-of-range index must be out of
range of the block stack the model has, whatever the family calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.checks import expect_client_error
from capture_conformance.harness.protocol.dialects import V1, missing
from capture_conformance.harness.protocol.features import absent_note, route_absent

pytestmark = pytest.mark.area("bad_input")

CLIENT_ERROR = (400, 422)
LOAD, PURE = "POST /models/load", "POST /test_pure_nnsight"
FILES, DELETE = "GET /v1/activations/{run_id}/{name}", "DELETE /v1/activations/{run_id}"


@dataclass
class Case:
    id: str
    body: Any = None  # merged into a valid chat request unless raw/path say otherwise
    expect: tuple[int, ...] = CLIENT_ERROR
    mention: str | None = None
    raw: bytes | None = None  # sent as-is with a JSON content type
    method: str = "POST"
    path: str = "/v1/chat/completions"
    replace: bool = False  # body replaces the valid request instead of updating it
    drop: list[str] = field(default_factory=list)
    feature: str | None = None  # the route this case is about, when the protocol's server may lack it
    may_serve: bool = False  # a 200 whose body is JSON is as right as a 4xx


def _capture(**capture) -> dict:
    return {"capture": capture}


CHAT_CASES = [
    Case("malformed-json", raw=b'{"model": "x", "messages": [{"role": '),
    Case("body-not-an-object", body=[1, 2, 3], replace=True),
    Case("missing-messages", drop=["messages"]),
    Case("messages-not-a-list", body={"messages": "hello"}),
    Case("message-without-content", body={"messages": [{"role": "user"}]}),
    Case("content-not-a-string", body={"messages": [{"role": "user", "content": {"text": 5}}]}),
    Case("max-tokens-zero", body={"max_tokens": 0}),
    Case("max-tokens-negative", body={"max_tokens": -3}),
    Case("max-tokens-not-a-number", body={"max_tokens": "five"}),
    Case("temperature-not-a-number", body={"temperature": "hot"}),
    Case("n-2", body={"n": 2}, expect=(400,)),
    Case("unknown-model", body={"model": "capture-conformance/no-such-model"}, expect=(404,)),
    Case("unknown-selector", body=_capture(savepoints=["no_such_module"]), expect=(422,),
         mention="no_such_module"),
    Case("unknown-selector-in-object", body=_capture(savepoints=[{"name": "x", "selector": "{head}z"}]),
         expect=(422,), mention="{head}z"),
    Case("selector-out-of-range", body=_capture(savepoints=["{blocks}[99999]"]), expect=(422,),
         mention="{blocks}[99999]"),
    Case("selector-is-code", body=_capture(savepoints=["__import__('os').getcwd()"]), expect=(422,)),
    Case("selector-reaches-outside-the-model", body=_capture(savepoints=["__class__.__init__"]), expect=(422,)),
    Case("selector-empty-segment", body=_capture(savepoints=["{head}..output"]), expect=(422,)),
    Case("duplicate-savepoint-names", body=_capture(savepoints=[{"name": "a", "selector": "{head}"},
                                                                 {"name": "a", "selector": "{block0}"}]),
         expect=(422,)),
    Case("savepoints-not-a-list", body=_capture(savepoints="{head}")),
    Case("capture-not-an-object", body={"capture": "all"}),
    Case("unknown-dtype", body=_capture(dtype="float64"), expect=(422,)),
    Case("unknown-format", body=_capture(format="npy"), expect=(422,)),
    Case("unknown-tokens", body=_capture(tokens="middle"), expect=(422,)),
    # What Python's json (and many servers' parsers) accept but JSON and Unicode do not:
    # refused with a 4xx whose body is itself valid JSON, not a 500 (docs/protocol.md).
    Case("temperature-nan", raw=b'{"model": "{model}", "messages": [{"role": "user", "content": "Hi"}], '
                                b'"max_tokens": 2, "temperature": NaN}'),
    Case("max-tokens-1e400", raw=b'{"model": "{model}", "messages": [{"role": "user", "content": "Hi"}], '
                                 b'"max_tokens": 1e400}'),
    # Python's json reads a lone surrogate as a str; a server may refuse it or serve it (its answer
    # must then still be JSON), never 500 (issue 15: "served or refused with a 4xx").
    Case("content-lone-surrogate", raw=b'{"model": "{model}", "messages": [{"role": "user", "content": "a\\ud800b"}], '
                                       b'"max_tokens": 2}', may_serve=True),
]

OTHER_CASES = [
    Case("load-without-model-id", path="/models/load", body={"dtype": "float32"}, replace=True,
         feature=LOAD),
    # Protocol 1.1: every field is validated first, so a typo is 422 even for the model already loaded.
    Case("load-unknown-dtype", path="/models/load", body={"model_id": "{model}", "dtype": "float64"},
         replace=True, expect=(422,), feature=LOAD),
    Case("pure-max-new-tokens-not-a-number", path="/test_pure_nnsight", body={"max_new_tokens": "many"},
         replace=True, feature=PURE),
    Case("unknown-run", method="GET", path="/v1/activations/no-such-run-0/_logits", expect=(404,), feature=FILES),
    Case("unknown-file-of-a-real-run", method="GET", path="/v1/activations/{run}/no_such_savepoint", expect=(404,),
         feature=FILES),
    Case("dot-dot-in-the-file", method="GET", path="/v1/activations/{run}/..%2F..%2F..%2Fetc%2Fpasswd",
         expect=(404,), feature=FILES),
    Case("dot-dot-as-the-run", method="GET", path="/v1/activations/..%2F..%2Fetc/passwd", expect=(404,),
         feature=FILES),
    Case("dot-dot-run-and-file", method="GET", path="/v1/activations/%2E%2E/%2E%2E", expect=(404,), feature=FILES),
    Case("delete-unknown-run", method="DELETE", path="/v1/activations/no-such-run-0", expect=(404,),
         feature=DELETE),
]


@pytest.fixture(scope="module")
def real_run(capture_runs) -> str:
    """A run that exists, so that 'unknown file' is not just 'unknown run' (only those cases need one)."""
    return capture_runs.chat(prompts.STORY, 1, store_activations=True).run_id


@pytest.fixture(scope="module")
def simplest_served(capture_runs):
    """The simplest generation the server serves, asked before any bad input; None if it serves none."""
    try:
        capture_runs.chat(prompts.STORY, 1, cached=False)
    except AssertionError:
        return None  # the chat area reports that; here /health must still answer after each case
    return lambda: capture_runs.chat(prompts.STORY, 1, cached=False)


def _templated(case: Case) -> bool:
    return any(mark in repr((case.body, case.mention)) for mark in ("{head}", "{block0}", "{blocks}"))


def _fill(value: Any, layout) -> Any:
    """The case's selector templates written in the model's own module paths."""
    if isinstance(value, str):
        return (value.replace("{head}", layout.head).replace("{block0}", layout.block(0))
                .replace("{blocks}", layout.blocks))
    if isinstance(value, list):
        return [_fill(v, layout) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, layout) for k, v in value.items()}
    return value


def _send(capture_client, capture_model, case: Case, run_id: str | None):
    path = case.path.replace("{run}", run_id or "")
    if case.raw is not None:
        raw = case.raw.replace(b"{model}", capture_model.encode())
        return capture_client.request(case.method, path, data=raw, headers={"Content-Type": "application/json"})
    if case.method != "POST":
        return capture_client.request(case.method, path)
    if case.replace:
        body = case.body
        if isinstance(body, dict):
            body = {k: (capture_model if v == "{model}" else v) for k, v in body.items()}
    else:
        body = {"model": capture_model, "messages": [{"role": "user", "content": prompts.STORY}], "max_tokens": 2,
                "temperature": 0.0}
        body.update(case.body or {})
        for key in case.drop:
            body.pop(key, None)
    return capture_client.post(path, body)


def _still_serving(capture_client, simplest_served, after: str) -> None:
    health = capture_client.health()
    assert health.status == 200, f"after {after}, /health is not 200: {health.describe()}"
    if simplest_served is not None:
        try:
            completion = simplest_served()
        except AssertionError as exc:
            raise AssertionError(f"after {after}, the server no longer serves a plain one-token chat it served "
                                 f"before: {exc}") from None
        assert completion.usage.completion_tokens >= 1 or completion.content, (
            f"after {after}, a plain one-token chat came back empty: {completion.body}")


@pytest.mark.parametrize("case", CHAT_CASES + OTHER_CASES, ids=lambda c: c.id)
def test_bad_input_is_a_client_error_and_the_server_carries_on(capture_client, capture_model, capture_features,
                                                                  capture_dialect, simplest_served, request, case):
    if capture_dialect != V1 and isinstance(case.body, dict) and "capture" in case.body:
        missing("the 'capture' object", capture_dialect)  # nothing to validate in a dialect without it
    if case.feature:
        capture_features.require(case.feature)
    run_id = request.getfixturevalue("real_run") if "{run}" in case.path else None
    if _templated(case):
        layout = request.getfixturevalue("model_layout")
        case = Case(**{**case.__dict__, "body": _fill(case.body, layout), "mention": _fill(case.mention, layout)})
    answer = _send(capture_client, capture_model, case, run_id)
    if route_absent(answer) and case.feature is None:
        raise AssertionError(f"{case.id}: {absent_note(answer)} (a route of protocol v1)")
    if case.may_serve and answer.status == 200:
        answer.json_object()  # served: the answer must still be JSON (raises, naming what came back)
    else:
        expect_client_error(answer, case.expect, mention=case.mention)
    _still_serving(capture_client, simplest_served, f"{case.id} ({answer.status})")
