"""Streaming: one SSE chunk per generated token, capture fields in the final chunk."""

from __future__ import annotations

import json

import pytest

from conftest import chat_body

CHAT = "/v1/chat/completions"


def sse_chunks(response) -> list[dict]:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("content,max_tokens", [("Tell me a short story about a fox.", 12), ("Say OK.", 12)])
def test_stream_has_one_chunk_per_token_and_equals_the_plain_response(client, content, max_tokens):
    plain = client.post(CHAT, json=chat_body(content, max_tokens, store_activations=True)).json()
    chunks = sse_chunks(client.post(CHAT, json=chat_body(content, max_tokens, store_activations=True, stream=True)))
    n = plain["usage"]["completion_tokens"]
    token_chunks = chunks[1:-1]  # role chunk first, finish chunk last
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(token_chunks) == n
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert final["completion_token_ids"] == plain["completion_token_ids"]
    assert final["activations_meta"]["_logits"]["shape"] == [1, n, 151936]
    assert client.get(final["activations_meta"]["_logits"]["url"]).status_code == 200


def test_stream_with_usage_puts_usage_and_capture_in_the_last_chunk(client):
    chunks = sse_chunks(client.post(CHAT, json=chat_body(max_tokens=4, capture={"tokens": "last"}, stream=True,
                                                          stream_options={"include_usage": True})))
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    assert last["activations_meta"]["_logits"]["shape"] == [1, 1, 151936] and len(last["completion_token_ids"]) == 4
    assert "activations_meta" not in chunks[-2]


def test_stream_respects_stop_strings(client):
    full = client.post(CHAT, json=chat_body(max_tokens=16)).json()["choices"][0]["message"]["content"]
    stop = full.split()[3]
    plain = client.post(CHAT, json=chat_body(max_tokens=16, stop=stop)).json()
    chunks = sse_chunks(client.post(CHAT, json=chat_body(max_tokens=16, stop=stop, stream=True)))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"] and stop not in text


def test_a_refused_stream_is_a_plain_4xx(client):
    response = client.post(CHAT, json=chat_body(stream=True, capture={"savepoints": ["nope"]}))
    assert response.status_code == 422 and "nope" in response.json()["detail"]
