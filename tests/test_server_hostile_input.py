"""Every value the JSON parser can produce is served or refused with a 4xx; never a 500 (issue 15).

Bodies are sent as raw bytes: ``NaN``, ``Infinity``, ``1e400`` and ``"\\ud800"``
are what Python's json module accepts and a careless client sends, and what a
JSON encoder on the client side would refuse to write.
"""

from __future__ import annotations

import json

import pytest

from conftest import chat_body, make_client

CHAT = "/v1/chat/completions"
OK_BODY = '{"model": "tiny-qwen3", "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 2, "temperature": 0'


def raw(client, path: str, text: str):
    return client.post(path, content=text.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"})


def chat_with(extra: str) -> str:
    return OK_BODY + (", " + extra if extra else "") + "}"


def assert_refused(client, response, status: int, names: str) -> None:
    assert response.status_code == status, response.text
    body = json.loads(response.content)  # strict JSON: the error itself must serialise
    assert names in json.dumps(body["detail"]), f"the error does not name {names!r}: {body['detail']}"
    assert client.get("/health").json()["status"] == "ok"
    after = raw(client, CHAT, chat_with(""))
    assert after.status_code == 200, after.text


NON_FINITE = [
    ("temperature NaN", "\"temperature\": NaN", "temperature"),
    ("temperature Infinity", "\"temperature\": Infinity", "temperature"),
    ("temperature 1e400", "\"temperature\": 1e400", "temperature"),
    ("top_p -Infinity", "\"top_p\": -Infinity", "top_p"),
    ("top_p NaN", "\"top_p\": NaN", "top_p"),
    ("max_tokens NaN", "\"max_tokens\": NaN", "max_tokens"),
    ("max_tokens 1e400", "\"max_tokens\": 1e400", "max_tokens"),
    ("max_completion_tokens Infinity", "\"max_completion_tokens\": Infinity", "max_completion_tokens"),
    ("seed NaN", "\"seed\": NaN", "seed"),
    ("n Infinity", "\"n\": Infinity", "n"),
    ("frequency_penalty NaN", "\"frequency_penalty\": NaN", "frequency_penalty"),
]
HUGE = [
    ("seed 2^64", f"\"seed\": {2**64}", "seed"),
    ("seed -2^63-1", f"\"seed\": {-(2**63) - 1}", "seed"),
    ("seed 300 digits", f"\"seed\": {10**300}", "seed"),
]
STRICT = [
    ("max_tokens true", "\"max_tokens\": true", "max_tokens"),
    ("max_tokens 2.0", "\"max_tokens\": 2.0", "max_tokens"),
    ("max_tokens '2'", "\"max_tokens\": \"2\"", "max_tokens"),
    ("stream 'true'", "\"stream\": \"true\"", "stream"),
    ("stream 1", "\"stream\": 1", "stream"),
    ("store_activations 'yes'", "\"store_activations\": \"yes\"", "store_activations"),
    ("temperature true", "\"temperature\": true", "temperature"),
    ("temperature '0.5'", "\"temperature\": \"0.5\"", "temperature"),
    ("include_usage 'true'", "\"stream_options\": {\"include_usage\": \"true\"}", "include_usage"),
    # A name is a URL path segment: clients remove `.` and `..` segments, so those files could never be fetched.
    ("savepoint named '..'", "\"capture\": {\"savepoints\": [{\"name\": \"..\", \"selector\": \"logits\"}]}", "name"),
    ("savepoint named '.'", "\"capture\": {\"savepoints\": [{\"name\": \".\", \"selector\": \"logits\"}]}", "name"),
]
SURROGATES = [
    ("model", '"model": "tiny\\ud800", "messages": [{"role": "user", "content": "hi"}]', "model"),
    ("content", '"model": "tiny-qwen3", "messages": [{"role": "user", "content": "a\\ud800b"}]', "content"),
    ("low surrogate", '"model": "tiny-qwen3", "messages": [{"role": "user", "content": "\\udc00"}]', "content"),
    ("stop", '"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "stop": "a\\ud800"', "stop"),
    ("stop list", '"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]', "stop"),
    ("selector", '"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], '
                 '"capture": {"savepoints": ["lm\\ud800"]}', "savepoints"),
]
UNSUPPORTED = [
    ("logprobs", "\"logprobs\": true", "logprobs"),
    ("top_logprobs", "\"top_logprobs\": 3", "top_logprobs"),
    ("tools", "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]", "tools"),
    ("tool_choice", "\"tool_choice\": \"required\"", "tool_choice"),
    ("response_format", "\"response_format\": {\"type\": \"json_object\"}", "response_format"),
    ("frequency_penalty", "\"frequency_penalty\": 5", "frequency_penalty"),
    ("presence_penalty", "\"presence_penalty\": -1.5", "presence_penalty"),
    ("logit_bias", "\"logit_bias\": {\"15\": 100}", "logit_bias"),
    ("several at once", "\"logprobs\": true, \"tools\": [{}], \"presence_penalty\": 1", "logprobs, tools, presence_penalty"),
]


@pytest.mark.parametrize("case,extra,names", NON_FINITE + HUGE + STRICT + UNSUPPORTED,
                         ids=[c[0] for c in NON_FINITE + HUGE + STRICT + UNSUPPORTED])
def test_chat_field_is_a_422_naming_it(client, case, extra, names):
    assert_refused(client, raw(client, CHAT, chat_with(extra)), 422, names)


@pytest.mark.parametrize("case,body,names", SURROGATES, ids=[c[0] for c in SURROGATES])
def test_lone_surrogate_is_a_422_naming_the_field(client, case, body, names):
    assert_refused(client, raw(client, CHAT, "{" + body + ', "max_tokens": 2}'), 422, names)


@pytest.mark.parametrize("body,names", [
    ('{"prompt": "a\\ud800"}', "prompt"),
    ('{"max_new_tokens": NaN}', "max_new_tokens"),
    ('{"max_new_tokens": true}', "max_new_tokens"),
    ('{"model": "\\udfff"}', "model"),
], ids=["prompt surrogate", "NaN", "bool", "model surrogate"])
def test_pure_nnsight_hostile_fields_are_422(client, body, names):
    assert_refused(client, raw(client, "/test_pure_nnsight", body), 422, names)


def test_a_huge_n_is_the_documented_400(client):
    assert_refused(client, raw(client, CHAT, chat_with(f'"n": {10**300}')), 400, "n=1")


def test_models_load_surrogate_is_422(client):
    assert_refused(client, raw(client, "/models/load", '{"model_id": "/tmp/\\ud800"}'), 422, "model_id")


def test_a_huge_body_is_not_echoed_whole_in_the_422(client):
    response = raw(client, CHAT, '{"model": "tiny-qwen3", "messages": "' + "x" * 200_000 + '"}')
    assert response.status_code == 422 and len(response.content) < 10_000, len(response.content)


@pytest.mark.parametrize("extra", [
    "\"logprobs\": false", "\"top_logprobs\": 0", "\"tools\": []", "\"tool_choice\": \"none\"",
    "\"response_format\": {\"type\": \"text\"}", "\"frequency_penalty\": 0", "\"presence_penalty\": 0.0",
    "\"logit_bias\": {}", "\"user\": \"u1\"", "\"seed\": 18446744073709551615", "\"seed\": -9223372036854775808",
], ids=lambda e: e.split(":")[0].strip('"'))
def test_no_op_values_and_edge_seeds_are_served(client, extra):
    response = raw(client, CHAT, chat_with(extra))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_a_temperature_below_the_epsilon_is_greedy(client):
    from capture_conformance.reference_server.input_rules import GREEDY_TEMPERATURE_EPS

    greedy = client.post(CHAT, json=chat_body(max_tokens=6, temperature=0, store_activations=True)).json()
    for temperature in (1e-300, 5e-324, GREEDY_TEMPERATURE_EPS / 2):
        response = client.post(CHAT, json=chat_body(max_tokens=6, temperature=temperature, seed=7, store_activations=True))
        assert response.status_code == 200, response.text
        assert response.json()["completion_token_ids"] == greedy["completion_token_ids"], temperature


def test_prompt_over_the_context_is_refused_with_both_numbers(client, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    context = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    content = "fox " * (context - 100)
    prompt_tokens = len(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"])
    assert prompt_tokens + 200 > context
    response = client.post(CHAT, json=chat_body(content=content, max_tokens=200))
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    for number in (context, prompt_tokens, 200, prompt_tokens + 200):
        assert str(number) in detail, f"{number} not in {detail!r}"
    # The same prompt with room left for its max_tokens is served.
    fits = context - prompt_tokens
    assert client.post(CHAT, json=chat_body(content=content, max_tokens=min(fits, 2))).status_code == 200
    # A short prompt asking for the whole context is refused too.
    short = client.post(CHAT, json=chat_body(max_tokens=context))
    assert short.status_code == 400 and str(context) in short.json()["detail"]


def test_pure_nnsight_is_under_the_same_limits(registry, tmp_path):
    with make_client(registry, tmp_path / "s", max_capture_mb=1.0, max_new_tokens_limit=8) as c:
        assert c.app.state.readiness.ready.wait(30)
        # 2 tokens x 151936 x 4 bytes = 1.16 MiB of logits > 1 MiB.
        too_big = c.post("/test_pure_nnsight", json={"max_new_tokens": 2})
        assert too_big.status_code == 422 and "--max-capture-mb" in too_big.json()["detail"], too_big.text
        over = c.post("/test_pure_nnsight", json={"max_new_tokens": 9})
        assert over.status_code == 422 and "--max-new-tokens-limit" in over.json()["detail"]
        long_prompt = c.post("/test_pure_nnsight", json={"prompt": "fox " * 5000})
        assert long_prompt.status_code == 400 and "context length" in long_prompt.json()["detail"], long_prompt.text
        assert c.post("/test_pure_nnsight", json={}).json()["logits_shape"] == [1, 1, 151936]
