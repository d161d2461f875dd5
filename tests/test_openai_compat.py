"""Issue 14: the message forms of current OpenAI clients, OpenAI's error envelope and the auth scheme."""

from __future__ import annotations

import pytest

from conftest import chat_body, make_client
from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID
from capture_conformance.reference_server import guards
from capture_conformance.reference_server.chat import template_messages

CHAT = "/v1/chat/completions"
KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture
def keyed(registry, tmp_path):
    with make_client(registry, tmp_path / "s", api_key="s3cret", max_body_bytes=4096, capture_budget_mb=8.0) as c:
        assert c.app.state.readiness.ready.wait(30)
        yield c


# -- messages ------------------------------------------------------------------------------------


def test_text_parts_are_joined_by_newlines_and_developer_is_system_unless_the_template_knows_it():
    messages = [{"role": "developer", "content": "Be terse."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    assert template_messages(messages, plain) == [{"role": "system", "content": "Be terse."},
                                                  {"role": "user", "content": "a\nb"}]
    knows = plain + "{% if m['role'] == 'developer' %}{% endif %}"
    assert template_messages(messages, knows)[0]["role"] == "developer"


def test_list_of_parts_and_developer_reach_the_chat_template(client, hf_reference):
    _, tokenizer = hf_reference
    body = chat_body(max_tokens=2)
    body["messages"] = [{"role": "developer", "content": [{"type": "text", "text": "You are terse."}]},
                        {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "OK."}]}]
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say\nOK."}],
        add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert response.json()["usage"]["prompt_tokens"] == len(expected)


@pytest.mark.parametrize("message,named", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}, "'image_url'"),
    ({"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {}}]},
     "'input_audio'"),
    ({"role": "user", "content": [{"text": "no type"}]}, "type None"),
    ({"role": "user", "content": [{"type": "text"}]}, "no string 'text'"),
    ({"role": "user", "content": []}, "empty list"),
    ({"role": "tool", "content": "42", "tool_call_id": "call_1"}, "role 'tool' is not supported"),
    ({"role": "wizard", "content": "hi"}, "unknown role 'wizard'"),
], ids=["image", "audio", "untyped-part", "text-without-text", "empty-list", "tool", "unknown-role"])
def test_unsupported_message_forms_are_a_422_naming_them(client, message, named):
    response = client.post(CHAT, json={**chat_body(max_tokens=1), "messages": [message]})
    assert response.status_code == 422, response.text
    body = response.json()
    assert named in body["error"]["message"], body
    assert body["error"]["param"].startswith("messages.0."), body
    assert client.post(CHAT, json=chat_body(max_tokens=1)).status_code == 200  # still serving


# -- the error envelope ----------------------------------------------------------------------------


def _envelope(response, status: int, reason: str, kind: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert "detail" in body, body  # the protocol's field stays
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert reason in error["message"] and error["type"] == kind, error
    return body


def test_every_kind_of_error_has_detail_and_the_openai_envelope(keyed, monkeypatch):
    _envelope(keyed.post(CHAT, json=chat_body()), 401, "unauthorized", "authentication_error")
    _envelope(keyed.post(CHAT, json=chat_body(content="x" * 5000), headers=KEY), 413, "--max-body-bytes",
              "invalid_request_error")
    body = _envelope(keyed.post(CHAT, json={**chat_body(), "max_tokens": "five"}, headers=KEY), 422, "max_tokens",
                     "invalid_request_error")
    assert body["error"]["param"] == "max_tokens" and isinstance(body["detail"], list)
    _envelope(keyed.post(CHAT, json=chat_body(model="no-such-model"), headers=KEY), 404, "no-such-model",
              "not_found_error")
    _envelope(keyed.get("/v1/activations/0123456789abcdef0123456789abcdef/x", headers=KEY), 404, "no run",
              "not_found_error")
    _envelope(keyed.get("/no/such/path", headers=KEY), 404, "Not Found", "not_found_error")
    _envelope(keyed.put(CHAT, headers=KEY), 405, "Method Not Allowed", "invalid_request_error")

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(keyed.app.state.registry, "get", broken)
    body = _envelope(keyed.post(CHAT, json=chat_body(), headers=KEY), 500, "internal error (RuntimeError)",
                     "server_error")
    assert "secret internals" not in str(body)


def test_the_openai_sdk_shows_the_reason_of_an_error(keyed):
    import openai

    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=keyed, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model=TINY_MODEL_ID, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}])
    exc = caught.value
    assert exc.status_code == 422 and exc.type == "invalid_request_error" and exc.param == "messages.0.content"
    assert "'image_url'" in exc.body["message"], exc.body

    wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=keyed, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.body["message"] == "unauthorized" and caught.value.type == "authentication_error"


# -- the auth scheme -------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bEaReR  s3cret"])
def test_the_scheme_is_case_insensitive(keyed, header):
    response = keyed.get("/v1/models", headers={"Authorization": header})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("header", ["bearer wrong", "bearer s3cret2", "bearer", "s3cret", "Basic s3cret",
                                    "bearers3cret", "Token s3cret", "bearer S3CRET"])
def test_a_wrong_scheme_or_key_is_still_401(keyed, header):
    response = keyed.get("/v1/models", headers={"Authorization": header})
    assert response.status_code == 401, response.text


def test_the_key_is_compared_in_constant_time_whatever_the_scheme(keyed, monkeypatch):
    compared = []
    real = guards.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guards.hmac, "compare_digest", spy)
    assert keyed.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert keyed.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
    assert compared == [(b"s3cret", b"s3cret"), (b"s3cret", b"s3cret")]


def test_an_error_after_the_stream_started_is_an_openai_error_event(client, monkeypatch):
    import json

    from capture_conformance.reference_server import service as service_module
    from capture_conformance.reference_server.errors import StorageFull

    def full(self, *args, **kwargs):
        raise StorageFull("storage limit reached (--max-storage-mb)")

    monkeypatch.setattr(service_module.CaptureService, "_store", full)
    response = client.post(CHAT, json=chat_body(max_tokens=2, capture={}, stream=True))
    assert response.status_code == 200  # the status line went out before the failure
    events = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error == {"message": "storage limit reached (--max-storage-mb)", "type": "server_error", "param": None,
                     "code": 507}
