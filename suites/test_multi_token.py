"""Area multi_token: one captured step per generated token, the right step in the right place.

These use only ``store_activations: true`` (the default capture), which servers
of the older family understand too, so a server that captures only the first
token fails here with a message that says so.
"""

from __future__ import annotations

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.checks import (
    expect_argmax_matches,
    expect_close,
    expect_different,
    expect_shape,
    expect_tensor_matches_meta,
    expect_token_counts,
    generated_count,
    rounding_tolerance,
)
from capture_conformance.harness.protocol.dialects import INTERVENTIONS
from capture_conformance.harness.protocol.stops import stop_for

pytestmark = pytest.mark.area("multi_token")

STEP_COUNTS = [1, 2, 5, 16]
# The smoke profile keeps one multi-token case, so a smoke run still tells single- from multi-token capture.
STEP_COUNTS_SMOKE_5 = [pytest.param(n, marks=pytest.mark.smoke) if n == 5 else n for n in STEP_COUNTS]
EARLY_STOP_BUDGET = 48


def _default_capture(capture_runs, steps: int, prompt: str = prompts.STORY, cached: bool = True):
    return capture_runs.chat(prompt, steps, store_activations=True, cached=cached)


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_all_token_logits_have_one_step_per_generated_token(capture_runs, ground_truth, steps):
    completion = _default_capture(capture_runs, steps)
    # The capture's own shape first: a wrong shape is the defect to name, not an id/usage mismatch after it.
    n = generated_count(completion)
    expect_shape(completion.savepoint("_logits"), [1, n, ground_truth.vocab_size], ground_truth, steps=n,
                 context="store_activations: true")
    expect_token_counts(completion, expected_steps=steps, tokenizer=ground_truth.tokenizer)


@pytest.mark.parametrize("steps", STEP_COUNTS_SMOKE_5)
def test_greedy_argmax_is_the_generated_token_at_every_step(capture_runs, ground_truth, steps):
    completion = _default_capture(capture_runs, steps)
    n = generated_count(completion)
    meta = completion.savepoint("_logits")
    expect_shape(meta, [1, n, ground_truth.vocab_size], ground_truth, steps=n, context="store_activations: true")
    tensor = capture_runs.tensor(completion, "_logits")
    expect_tensor_matches_meta(tensor, meta)
    expect_token_counts(completion, expected_steps=steps, tokenizer=ground_truth.tokenizer)
    expect_argmax_matches(tensor, completion.token_ids, name="_logits")


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_first_is_step_0_and_last_is_step_n_minus_1_of_all(capture_runs, ground_truth, steps):
    runs = {tokens: capture_runs.capture(prompts.STORY, steps, tokens=tokens) for tokens in ("all", "first", "last")}
    ids = runs["all"].token_ids
    for tokens, completion in runs.items():
        assert completion.token_ids == ids, (
            f"the same greedy request with tokens={tokens!r} generated {completion.token_ids}, with 'all' {ids}")
    n = expect_token_counts(runs["all"], expected_steps=steps)
    expect_shape(runs["all"].savepoint("_logits"), [1, n, ground_truth.vocab_size], ground_truth, steps=n,
                 context="tokens: all")
    whole = capture_runs.tensor(runs["all"], "_logits").values
    rtol, atol = rounding_tolerance("float32")
    first = capture_runs.tensor(runs["first"], "_logits").values
    last = capture_runs.tensor(runs["last"], "_logits").values
    expect_close(first, whole[:, :1], what="tokens 'first' vs step 0 of 'all'", rtol=rtol, atol=atol)
    expect_close(last, whole[:, n - 1 : n], what=f"tokens 'last' vs step {n - 1} of 'all'", rtol=rtol, atol=atol)


def test_early_end_of_sequence_ends_the_capture_too(capture_runs, ground_truth):
    completion = _default_capture(capture_runs, EARLY_STOP_BUDGET, prompts.SHORT_ANSWER)
    how = f"{prompts.SHORT_ANSWER!r} with max_tokens {EARLY_STOP_BUDGET}"
    if completion.finish_reason == "length":
        # The model never stopped on its own: end it with a stop string from its own greedy output instead.
        pick = stop_for(capture_runs, prompts.SHORT_ANSWER, completion, tokenizer=ground_truth.tokenizer)
        assert pick is not None, (
            f"cannot cut a stop string at a token boundary of the greedy output {completion.content!r}")
        stop = pick.stop
        completion = capture_runs.chat(prompts.SHORT_ANSWER, EARLY_STOP_BUDGET, store_activations=True, stop=[stop])
        how = (f"the model did not stop on its own for {prompts.SHORT_ANSWER!r}, so stop={stop!r} from its own "
               f"greedy output ended it")
    n = expect_token_counts(completion)
    assert completion.finish_reason == "stop" and n < EARLY_STOP_BUDGET, (
        f"{how}: expected finish_reason 'stop' before {EARLY_STOP_BUDGET} tokens, got "
        f"{completion.finish_reason!r} after {n}")
    meta = completion.savepoint("_logits")
    expect_shape(meta, [1, n, ground_truth.vocab_size], ground_truth, steps=n, context=how)
    tensor = capture_runs.tensor(completion, "_logits")
    expect_tensor_matches_meta(tensor, meta)
    expect_argmax_matches(tensor, completion.token_ids, name=f"_logits ({how})")


def test_each_request_gets_its_own_tensors(capture_runs, ground_truth):
    """No state leaks from one request into the next: two prompts, two sets of ids and tensors."""
    story = _default_capture(capture_runs, 5, prompts.STORY, cached=False)
    short = _default_capture(capture_runs, 5, prompts.SHORT_ANSWER, cached=False)
    assert story.run_id != short.run_id, f"two requests share activation_run_id {story.run_id!r}"
    assert story.token_ids != short.token_ids, (
        f"two different prompts generated the same ids {story.token_ids}: cannot tell requests apart")
    tensors = {}
    for label, completion in (("story", story), ("short answer", short)):
        tensor = capture_runs.tensor(completion, "_logits")
        expect_argmax_matches(tensor, completion.token_ids, name=f"_logits of the {label} request")
        tensors[label] = tensor.values
    first_steps = min(tensors["story"].shape[1], tensors["short answer"].shape[1])
    expect_different(tensors["story"][:, :first_steps], tensors["short answer"][:, :first_steps],
                     what="logits of two different prompts")


def test_multi_token_capture_matches_snapshot(capture_runs, shape_snapshot):
    shape_snapshot.check(_default_capture(capture_runs, 5))



@pytest.fixture(scope="module")
def interventions_capture(capture_client, capture_model, capture_dialect) -> dict:
    """The interventions dialect: one chat with capture configured server-wide (``POST /v1/interventions``)."""
    if capture_dialect != INTERVENTIONS:
        pytest.skip("only for the interventions dialect (protocol v1 captures per request: the tests above)")
    config = {"enabled": True, "layers": [0], "hook_points": ["input_layernorm.output"], "mode": "trace",
              "per_request_subdir": True, "save_format": "pt"}
    capture_client.post("/v1/interventions", config).ok_json()
    try:
        body = capture_client.chat(capture_model, prompts.STORY, 5).ok_json()
    finally:  # leave the server as the harness found it as far as the dialect allows: capture off
        capture_client.post("/v1/interventions", {**config, "enabled": False})
    artifacts = (body.get("ndif") or {}).get("artifacts")
    assert isinstance(artifacts, dict) and artifacts, f"capture enabled, but the response has no ndif.artifacts: {body}"
    for key, entry in artifacts.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        assert isinstance(shape, list) and len(shape) == 3, f"artifact {key!r}: shape {shape!r} is not [1, T, D]"
    return body


@pytest.mark.dialect(INTERVENTIONS)
def test_interventions_capture_covers_every_generated_step(interventions_capture):
    usage = interventions_capture.get("usage") or {}
    prompt_tokens, steps = usage.get("prompt_tokens"), usage.get("completion_tokens")
    for key, entry in sorted(interventions_capture["ndif"]["artifacts"].items()):
        shape = entry["shape"]
        if isinstance(prompt_tokens, int) and shape[1] <= prompt_tokens:
            raise AssertionError(
                f"prompt-only capture: artifact {key!r} is {shape}, {shape[1]} positions for a {prompt_tokens}-token "
                f"prompt and {steps} generated tokens: no generated position is captured")


@pytest.mark.dialect(INTERVENTIONS)
def test_interventions_artifacts_keep_every_feature(interventions_capture, ground_truth):
    width = ground_truth.hidden_size
    for key, entry in sorted(interventions_capture["ndif"]["artifacts"].items()):
        saved = entry.get("saved_shape", entry["shape"])
        if isinstance(saved, list) and saved and width and saved[-1] < width:
            raise AssertionError(
                f"truncated last dimension: artifact {key!r} saved_shape {saved} keeps {saved[-1]} of the {width} "
                f"hidden features (shape {entry['shape']}; sample_hidden?)")
