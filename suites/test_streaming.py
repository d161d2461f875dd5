"""Area streaming (optional in the protocol): ``stream: true`` as OpenAI's server-sent events.

A server that does not stream is reported as such ("no streaming: ..."), with
what it answered; the bundled reference server streams, so there it is a failure.

A streamed run's capture is downloaded and compared with the same request
unstreamed (protocol 1.2): the same ids and the same tensors, within the capture
dtype's rounding, for every savepoint kind (the head, a block, a block's input) and
every position mode the server declares in ``capture.features``.
"""

from __future__ import annotations

import json

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.checks import expect_shape, rounding_tolerance
from capture_conformance.harness.protocol.dialects import INTERVENTIONS, STORE, V1, missing
from capture_conformance.harness.protocol.responses import Completion, SavepointMeta
from capture_conformance.harness.protocol.same_run import difference

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


# Fields of a streamed run that its last chunk (or the usage chunk after it) carries, as a completion's body has them.
CAPTURE_FIELDS = ("activation_run_id", "completion_token_ids", "prompt_token_ids", "activations_meta", "usage")
STREAM_STEPS = 5


def _streamed_completion(chunks: list[dict], request: dict) -> Completion:
    """The streamed run as a completion: its text, finish_reason and the capture fields of its last chunks."""
    body: dict = {}
    for chunk in chunks:
        body.update({k: chunk[k] for k in CAPTURE_FIELDS if k in chunk})
    finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": _text(chunks)},
                        "finish_reason": finish[-1] if finish else None}]
    return Completion(body, request)


def _declared_positions(capture_client, capture_model) -> list[str] | None:
    features = (capture_client.capture_block(capture_model) or {}).get("features")
    return [f for f in ("prompt", "sequence") if f in features] if isinstance(features, list) else None


# (positions, tokens): generated tokens with every step and with the last only, and each 1.1 position mode.
MODES = [("generated", "all"), ("generated", "last"), ("prompt", "all"), ("sequence", "all")]


@pytest.mark.parametrize(("positions", "tokens"), MODES, ids=[f"{p}-{t}" for p, t in MODES])
def test_a_streamed_capture_equals_the_same_request_unstreamed(capture_client, capture_options, capture_model,
                                                               capture_runs, capture_dialect, model_layout,
                                                               positions, tokens):
    if capture_dialect != V1:  # the interventions family captures per server, the older family has no `capture`
        missing("per-request capture" if capture_dialect == INTERVENTIONS else "the 'capture' object", capture_dialect)
    if positions != "generated":
        declared = _declared_positions(capture_client, capture_model)
        if declared is None or positions not in declared:
            # Only the modes a server declares are compared; the positions area reports a lacking mode.
            pytest.skip(f"no {positions!r} capture declared: /v1/models capture.features "
                        f"{'is absent' if declared is None else 'has ' + str(declared)}; a streamed {positions!r} "
                        f"capture is compared only where the server declares the mode")
    # Every savepoint kind: the head, a block's output, a block's input (listed out of execution order).
    last = model_layout.last
    savepoints = [{"name": "head", "selector": model_layout.head},
                  {"name": "block", "selector": model_layout.block(last)},
                  {"name": "block_input", "selector": model_layout.block(0, io="input")}]
    capture = {"savepoints": savepoints, "tokens": tokens,
               **({"positions": positions} if positions != "generated" else {})}
    plain = capture_runs.chat(prompts.STORY, STREAM_STEPS, capture=capture)
    request = capture_runs.request_body(prompts.STORY, STREAM_STEPS, capture=capture, stream=True,
                                        stream_options={"include_usage": True})
    chunks = _stream(capture_client, capture_options, capture_model, STREAM_STEPS, capture=capture,
                     stream_options={"include_usage": True})
    streamed = _streamed_completion(chunks, request)
    assert streamed.token_ids == plain.token_ids, (
        f"streamed completion_token_ids {streamed.token_ids} differ from the unstreamed {plain.token_ids} "
        f"under greedy decoding ({positions}, tokens {tokens})")
    if "prompt_token_ids" in plain.body:
        assert streamed.body.get("prompt_token_ids") == plain.body["prompt_token_ids"], (
            f"streamed prompt_token_ids {streamed.body.get('prompt_token_ids')} differ from the unstreamed "
            f"{plain.body['prompt_token_ids']}")
    problems = []
    for spec in savepoints:
        name = spec["name"]
        got, want = capture_runs.tensor(streamed, name), capture_runs.tensor(plain, name)
        rtol, atol = rounding_tolerance(want.dtype)
        if got.dtype != want.dtype:
            problems.append(f"`{name}` is {got.dtype} streamed, {want.dtype} unstreamed")
            continue
        said = difference(got.values, want.values, rtol=rtol, atol=atol)
        if said:
            problems.append(f"`{name}` ({spec['selector']}): {said}")
    assert not problems, (f"streamed capture differs from the unstreamed run of the same request "
                          f"({positions} positions, tokens {tokens}, {len(plain.token_ids)} tokens): "
                          + "; ".join(problems))
