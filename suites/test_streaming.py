"""Area streaming (optional in the protocol): ``stream: true`` as OpenAI's server-sent events.

A server that does not stream is reported as such ("no streaming: ..."), with
what it answered; the bundled reference server streams, so there it is a failure.
"""

from __future__ import annotations

import json

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.checks import expect_shape
from capture_conformance.harness.protocol.dialects import INTERVENTIONS, STORE, missing
from capture_conformance.harness.protocol.responses import SavepointMeta

pytestmark = pytest.mark.area("streaming")


def _stream(capture_client, capture_options, capture_model, max_tokens: int, **extra) -> list[dict]:
    body = {"model": capture_model, "messages": [{"role": "user", "content": prompts.STORY}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
    answer = capture_client.post("/v1/chat/completions", body)
    if answer.status != 200 or not answer.content_type.startswith("text/event-stream"):
        message = f"no streaming: asked with stream=true, {answer.describe()}"
        if capture_options.requires("streaming"):
            pytest.fail(message + " (streaming is required: --require-feature streaming, or the bundled server)")
        pytest.skip(message)
    events = [line[len("data:"):].strip() for line in answer.text.splitlines() if line.startswith("data:")]
    assert events and events[-1] == "[DONE]", f"the stream does not end with 'data: [DONE]': {events[-3:]}"
    chunks = []
    for event in events[:-1]:
        try:
            chunks.append(json.loads(event))
        except ValueError:
            pytest.fail(f"a stream event is not JSON: {event[:200]!r}")
    errors = [c["error"] for c in chunks if "error" in c]
    assert not errors, f"the stream reported an error: {errors[0]}"
    assert all(c.get("object") == "chat.completion.chunk" for c in chunks), (
        f"every chunk should be a 'chat.completion.chunk': {[c.get('object') for c in chunks][:5]}")
    return chunks


def _text(chunks: list[dict]) -> str:
    return "".join((c["choices"][0].get("delta") or {}).get("content") or "" for c in chunks if c.get("choices"))


def test_streamed_text_equals_the_plain_completion(capture_client, capture_options, capture_model, capture_runs):
    plain = capture_runs.chat(prompts.STORY, 12)
    chunks = _stream(capture_client, capture_options, capture_model, 12)
    assert _text(chunks) == plain.content, (
        f"concatenated deltas differ from the non-streamed text under greedy decoding:\n"
        f"  streamed: {_text(chunks)!r}\n  plain:    {plain.content!r}")
    finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    assert finish[-1] == plain.finish_reason, f"finish_reason {finish[-1]!r}, the plain completion says {plain.finish_reason!r}"


def test_the_stream_is_token_by_token(capture_client, capture_options, capture_model):
    chunks = _stream(capture_client, capture_options, capture_model, 12)
    with_text = [c for c in chunks if c.get("choices") and (c["choices"][0].get("delta") or {}).get("content")]
    assert len(with_text) >= 6, (
        f"12 generated tokens came in {len(with_text)} chunk(s) with text: the stream is not token by token")


def test_the_final_chunk_keeps_the_capture_contract(capture_client, capture_options, capture_model, ground_truth,
                                                     capture_dialect):
    if capture_dialect == INTERVENTIONS:
        missing("per-request capture", capture_dialect)
    if capture_dialect == STORE:
        missing("the 'capture' object", capture_dialect)
    chunks = _stream(capture_client, capture_options, capture_model, 5, capture={"tokens": "all"},
                     stream_options={"include_usage": True})
    final = chunks[-1]
    assert "activations_meta" in final, (
        f"the last chunk before [DONE] has no activations_meta (keys: {sorted(final)})")
    ids = final.get("completion_token_ids")
    assert isinstance(ids, list) and ids, f"the last chunk's completion_token_ids: {ids!r}"
    usage = final.get("usage") or {}
    assert usage.get("completion_tokens") == len(ids), (
        f"usage.completion_tokens {usage.get('completion_tokens')} vs {len(ids)} completion_token_ids")
    meta = SavepointMeta("_logits", final["activations_meta"]["_logits"])
    expect_shape(meta, [1, len(ids), ground_truth.vocab_size], ground_truth, steps=len(ids),
                 context="streamed `_logits`")
