"""Fuzzing with a bounded budget: schemathesis over the server's own OpenAPI, hypothesis over capture options.

Budget: FUZZ_EXAMPLES examples per operation and mode (schemathesis), and
HYPOTHESIS_EXAMPLES bodies (hypothesis); both derandomised so CI is repeatable.
Generation is capped at 3 tokens so the budget buys breadth, not decoding.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection

from conftest import make_client

FUZZ_EXAMPLES = 25
HYPOTHESIS_EXAMPLES = 150
HOSTILE_EXAMPLES = 120


@pytest.fixture(scope="module")
def fuzz_app(registry, tmp_path_factory):
    with make_client(registry, tmp_path_factory.mktemp("fuzz"), max_new_tokens_limit=3, max_capture_mb=64.0) as c:
        assert c.app.state.readiness.ready.wait(30)
        yield c


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_openapi_fuzz_no_5xx_and_invalid_data_rejected(fuzz_app, mode):
    # schemathesis's own pytest integration (from_fixture) does not run under pytest 9:
    # drive its strategies with hypothesis directly instead.
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    if mode is GenerationMode.NEGATIVE:
        # Invalid input exists only for a JSON body: path parameters are unconstrained strings.
        operations = [op for op in operations if op.body]
    for operation in operations:
        @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error, negative_data_rejection])

        fuzz()


selector_parts = st.one_of(
    st.sampled_from(["model", "layers", "lm_head", "norm", "mlp", "self_attn", "__class__", "_modules", "os", "0", "1", "99"]),
    st.text(alphabet=st.characters(codec="ascii"), max_size=8),
)
selectors = st.one_of(
    st.sampled_from(["lm_head", "logits", "model.layers[0]", "model.layers.1.mlp", "lm_head.input", "model.norm.output"]),
    st.lists(selector_parts, min_size=1, max_size=5).map(".".join),
    st.builds(lambda a, i, io: f"{a}[{i}]{io}", selector_parts, st.integers(-3, 200), st.sampled_from(["", ".input", ".output", ".x"])),
    st.text(max_size=40),
)
savepoint = st.one_of(selectors, st.fixed_dictionaries({"name": st.text(max_size=12), "selector": selectors}))
capture = st.fixed_dictionaries(
    {},
    optional={
        "savepoints": st.lists(savepoint, max_size=4),
        "tokens": st.sampled_from(["all", "first", "last", "none", 3, None]),
        "dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8", ""]),
        "format": st.sampled_from(["pt", "safetensors", "npy"]),
    },
)


@settings(max_examples=HYPOTHESIS_EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(capture=capture, max_tokens=st.integers(-1, 5))
def test_capture_options_never_5xx_and_valid_ones_keep_the_shape_contract(fuzz_app, capture, max_tokens):
    body = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": max_tokens,
            "temperature": 0, "capture": capture}
    response = fuzz_app.post("/v1/chat/completions", json=body)
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    if response.status_code == 200:
        data = response.json()
        n = data["usage"]["completion_tokens"]
        for meta in data["activations_meta"].values():
            steps = n if meta["tokens"] == "all" else 1
            assert meta["shape"][:2] == [1, steps]
    else:
        assert response.status_code in (400, 404, 413, 422), response.text


# -- hostile scalars (issue 15): what json.loads yields that no schema example does ----------

class Raw(str):
    """A number literal written into the body as is: 1e400, 400-digit integers."""


hostile_scalar = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 2**64, 2**64 - 1, -(2**63) - 1, 2**63, 0, -1, 1e-300, 5e-324]),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.sampled_from([Raw("1e400"), Raw("-1e400"), Raw("1" + "0" * 400), Raw("-0.0"), Raw("1E-400")]),
    st.booleans(),
    st.none(),
    st.sampled_from(["true", "1", "0.5", "", "NaN"]),
    # Lone surrogates (category Cs) among ordinary characters: not Unicode text.
    st.text(alphabet=st.one_of(st.characters(codec="utf-8"), st.characters(categories=["Cs"])), max_size=6),
    st.lists(st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=3)), max_size=3),
)
CHAT_FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stop", "stream",
               "store_activations", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "tools",
               "response_format", "model", "user", "stream_options"]


def dumps_hostile(body: dict) -> bytes:
    raws: list[str] = []

    def mark(value):
        if isinstance(value, Raw):
            raws.append(value)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    # ensure_ascii writes a lone surrogate as the escape \ud800, as a client's encoder would.
    text = json.dumps(mark(body), allow_nan=True, ensure_ascii=True)
    for i, literal in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', literal)
    return text.encode()


def strict_json(content: bytes):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(content, parse_constant=refuse)


@settings(max_examples=HOSTILE_EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fields=st.dictionaries(st.sampled_from(CHAT_FIELDS), hostile_scalar, min_size=1, max_size=3),
       content=st.one_of(st.just("Say OK."), hostile_scalar), path=st.sampled_from(["chat", "chat", "chat", "pure"]))
def test_hostile_scalars_are_served_or_a_clean_4xx(fuzz_app, fields, content, path):
    if path == "pure":
        body = {"prompt": content, **{k: v for k, v in fields.items() if k == "model"}, "max_new_tokens": fields.get("max_tokens", 1)}
        url = "/test_pure_nnsight"
    else:
        body = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
                "temperature": 0, **fields}
        url = "/v1/chat/completions"
    response = fuzz_app.post(url, content=dumps_hostile(body), headers={"content-type": "application/json"})
    assert response.status_code in (200, 400, 404, 413, 422), (response.status_code, response.text[:500])
    assert "Traceback" not in response.text
    if response.headers["content-type"].startswith("application/json"):
        strict_json(response.content)  # the answer itself is strict JSON: no NaN, no lone surrogate
