"""Area single_token: ``tokens: first`` / ``last``, one new token, and ``/test_pure_nnsight``."""

from __future__ import annotations

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.features import MISSING, absent_note, route_absent
from capture_conformance.harness.protocol.checks import (
    expect_argmax_matches,
    expect_shape,
    expect_tensor_matches_meta,
    expect_token_counts,
    generated_count,
)

pytestmark = pytest.mark.area("single_token")

STEPS = 5
PURE_STEPS = 6


@pytest.mark.smoke
def test_first_token_capture_is_step_0(capture_runs, ground_truth):
    completion = capture_runs.capture(prompts.STORY, STEPS, tokens="first")
    meta = completion.savepoint("_logits")
    expect_shape(meta, [1, 1, ground_truth.vocab_size], ground_truth, steps=generated_count(completion),
                 context="tokens: first")
    expect_token_counts(completion, expected_steps=STEPS, tokenizer=ground_truth.tokenizer)
    tensor = capture_runs.tensor(completion, "_logits")
    expect_tensor_matches_meta(tensor, meta)  # the file holds what the metadata says, before its values count
    expect_argmax_matches(tensor, completion.token_ids, name="_logits (first)")


def test_last_token_capture_is_the_last_step(capture_runs, ground_truth):
    completion = capture_runs.capture(prompts.STORY, STEPS, tokens="last")
    n = expect_token_counts(completion, expected_steps=STEPS)
    ids = completion.token_ids
    meta = completion.savepoint("_logits")
    expect_shape(meta, [1, 1, ground_truth.vocab_size], ground_truth, steps=n, context="tokens: last")
    tensor = capture_runs.tensor(completion, "_logits")
    expect_tensor_matches_meta(tensor, meta)
    if ids[0] != ids[-1] and tensor.values[0, 0].argmax() == ids[0]:
        raise AssertionError(f"tokens: last holds step 0 (argmax {ids[0]}), not step {n - 1} (id {ids[-1]})")
    expect_argmax_matches(tensor, ids, name="_logits (last)", first_step=n - 1)


def test_one_new_token_gives_one_step(capture_runs, ground_truth):
    completion = capture_runs.chat(prompts.STORY, 1, store_activations=True)
    meta = completion.savepoint("_logits")
    expect_shape(meta, [1, 1, ground_truth.vocab_size], ground_truth, steps=generated_count(completion),
                 context="max_tokens 1")
    tensor = capture_runs.tensor(completion, "_logits")
    expect_tensor_matches_meta(tensor, meta)
    expect_token_counts(completion, expected_steps=1, tokenizer=ground_truth.tokenizer)
    expect_argmax_matches(tensor, completion.token_ids, name="_logits")


def _pure(capture_client, capture_model, capture_features=None, **body) -> dict:
    if capture_features is not None:  # all but the smoke test: a missing route is reported once, there
        capture_features.require("POST /test_pure_nnsight")
    answer = capture_client.pure_nnsight(model=capture_model, **body)
    if route_absent(answer):
        raise AssertionError(f"{MISSING}: POST /test_pure_nnsight ({absent_note(answer)})")
    result = answer.ok_json()
    assert result.get("success") is True, f"/test_pure_nnsight did not report success: {result}"
    assert isinstance(result.get("generated_text"), str), f"generated_text should be a string: {result}"
    dtype = result.get("logits_dtype")
    assert isinstance(dtype, str) and dtype.startswith("torch."), f"logits_dtype should be like 'torch.float32': {result}"
    shape = result.get("logits_shape")
    assert isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) for d in shape), (
        f"logits_shape should be [1, N, V]: {result}")
    return result


@pytest.mark.smoke
def test_pure_nnsight_one_new_token_is_1_1_v(capture_client, capture_model, ground_truth):
    result = _pure(capture_client, capture_model, prompt=prompts.RAW_PROMPT, max_new_tokens=1)
    assert result["logits_shape"] == [1, 1, ground_truth.vocab_size], (
        f"/test_pure_nnsight with max_new_tokens 1: logits_shape {result['logits_shape']}, "
        f"expected [1, 1, {ground_truth.vocab_size}]")


def test_pure_nnsight_defaults_to_one_new_token(capture_client, capture_model, ground_truth, capture_features):
    result = _pure(capture_client, capture_model, capture_features, prompt=prompts.RAW_PROMPT)
    assert result["logits_shape"] == [1, 1, ground_truth.vocab_size], (
        f"/test_pure_nnsight without max_new_tokens: logits_shape {result['logits_shape']}, expected [1, 1, V]")


def test_pure_nnsight_n_new_tokens_is_1_n_v(capture_client, capture_model, ground_truth, capture_features):
    result = _pure(capture_client, capture_model, capture_features, prompt=prompts.RAW_PROMPT,
                   max_new_tokens=PURE_STEPS)
    shape = result["logits_shape"]
    if shape[:2] == [1, 1]:
        raise AssertionError(
            f"single-token capture only: /test_pure_nnsight logits_shape is [1,1,V] for max_new_tokens {PURE_STEPS}")
    assert shape == [1, PURE_STEPS, ground_truth.vocab_size], (
        f"/test_pure_nnsight with max_new_tokens {PURE_STEPS} on an open-ended prompt: logits_shape {shape}, "
        f"expected [1, {PURE_STEPS}, {ground_truth.vocab_size}] (generated {result['generated_text']!r})")


def test_first_and_last_capture_shapes_match_snapshot(capture_runs, model_layout, shape_snapshot):
    completion = capture_runs.capture(
        prompts.STORY, STEPS, tokens="first",
        savepoints=[{"name": "_logits", "selector": model_layout.head},
                    {"name": "layer_0", "selector": model_layout.block(0)}],
    )
    shape_snapshot.check(completion)
