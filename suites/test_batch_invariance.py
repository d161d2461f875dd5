"""Area out_of_order: batch invariance. A request's capture does not depend on the requests beside it.

A server that runs concurrent requests in one batch pads the shorter prompts and
assigns rows; either can go wrong without changing a shape or an id. So concurrent
greedy requests of deliberately different prompt lengths, and of equal length (where
a swapped row is the likelier bug), with mixed capture options, are each compared by
value with the same request sent alone, at every savepoint kind (the head, the first
and the last block, a block's input), for prefill (prompt positions, where the server
declares ``"prompt"`` in ``capture.features``) and decode (generated positions). A
server that declares ``"batch_invariant"`` there is held to bitwise equality; others
to the rounding of the capture dtype. And a prompt sent twice in a row, then twice at
once, gets its whole prompt captured every time: no prefix cache may shorten it.

Requests are few and short (4 tokens): the suites run in ``make test`` many times.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.checks import expect_all_clean, rounding_tolerance, watching
from capture_conformance.harness.protocol.dialects import INTERVENTIONS, V1, missing
from capture_conformance.harness.protocol.responses import Completion
from capture_conformance.harness.protocol.same_run import difference

pytestmark = pytest.mark.area("out_of_order")

STEPS = 4
BITWISE_FEATURE = "batch_invariant"
SHORT = "Hi."
MIDDLE = "What is 2+2?"
LONG = ("Tell me a long story about a fox who lives in a quiet forest by a river, "
        "and what she finds one winter morning.")
# Prompts of one shape, among which two tokenise to the same length with any plausible tokenizer.
SAME_SHAPE = [f"Tell me a short story about a {thing}." for thing in ("fox", "cat", "dog", "bee", "robot", "river")]


@pytest.fixture(scope="module")
def setting(capture_client, capture_model, capture_dialect, model_layout):
    """What the server declares (prompt positions, bitwise invariance) and the savepoints of every kind."""
    if capture_dialect != V1:  # mixed capture options need the per-request `capture` object
        missing("per-request capture" if capture_dialect == INTERVENTIONS else "the 'capture' object", capture_dialect)
    features = (capture_client.capture_block(capture_model) or {}).get("features")
    features = features if isinstance(features, list) else []
    kinds = {"head": model_layout.head, "first": model_layout.block(0), "last": model_layout.block(model_layout.last),
             "input": model_layout.block(model_layout.last, io="input")}
    return {"prompt": "prompt" in features, "bitwise": BITWISE_FEATURE in features, "kinds": kinds,
            "features": features}


def _capture(setting, names: list[str], *, positions: str = "generated", tokens: str = "all") -> dict:
    if positions == "prompt" and not setting["prompt"]:
        positions = "generated"  # prefill is then covered by step 0 only: the server declares no prompt capture
    return {"savepoints": [{"name": n, "selector": setting["kinds"][n]} for n in names], "tokens": tokens,
            **({"positions": positions} if positions != "generated" else {})}


def _send(capture_runs, prompt: str, capture: dict) -> Completion:
    return capture_runs.chat(prompt, STEPS, capture=capture, cached=False)


def _compare(capture_runs, setting, solo: Completion, together: Completion, label: str) -> list[str]:
    """What differs between a request's run among others and its solo run (empty when nothing)."""
    if together.token_ids != solo.token_ids:
        return [f"{label}: generated {together.token_ids} among concurrent requests, {solo.token_ids} alone"]
    if together.body.get("prompt_token_ids") != solo.body.get("prompt_token_ids"):
        return [f"{label}: prompt_token_ids differ among concurrent requests"]
    problems = []
    for name in solo.meta:
        got, want = capture_runs.tensor(together, name), capture_runs.tensor(solo, name)
        if got.dtype != want.dtype:
            problems.append(f"{label}: `{name}` is {got.dtype} batched, {want.dtype} alone")
            continue
        rtol, atol = rounding_tolerance(want.dtype)
        said = difference(got.values, want.values, rtol=rtol, atol=atol, bitwise=setting["bitwise"])
        if said:
            problems.append(f"{label}: `{name}` ({setting['kinds'][name]}, positions "
                            f"{solo.meta[name].raw.get('positions', 'generated')}, tokens "
                            f"{solo.meta[name].raw.get('tokens', 'all')}): {said}")
    return problems


def _round(capture_runs, setting, requests: list[tuple[str, str, dict]]) -> None:
    """Each (label, prompt, capture) alone, then all at once; every one must equal its solo run."""
    solo = [_send(capture_runs, prompt, capture) for _, prompt, capture in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: _send(capture_runs, r[1], r[2]), requests))
    problems = [p for (label, _, _), alone, among in zip(requests, solo, together)
                for p in _compare(capture_runs, setting, alone, among, label)]
    how = "bit for bit (the server declares batch_invariant)" if setting["bitwise"] else "within the dtype's rounding"
    assert not problems, (f"batched capture differs from its solo run ({how}): " + "; ".join(problems))


def test_concurrent_requests_of_different_prompt_lengths_equal_their_solo_runs(capture_client, capture_runs, setting):
    everything = ["head", "first", "last", "input"]
    requests = [
        ("short prompt, every savepoint kind, decode", SHORT, _capture(setting, everything)),
        ("long prompt, head and first block, decode", LONG, _capture(setting, ["head", "first"])),
        ("middle prompt, last token of the last block and its input", MIDDLE,
         _capture(setting, ["last", "input"], tokens="last")),
        ("story prompt, blocks and an input, prefill", prompts.STORY,
         _capture(setting, ["first", "last", "input"], positions="prompt")),
        ("short prompt, head and first block, prefill", SHORT, _capture(setting, ["head", "first"], positions="prompt")),
    ]
    with watching(capture_client) as seen:
        _round(capture_runs, setting, requests)
    expect_all_clean(seen)


def _equal_length_pair(capture_client, capture_model, ground_truth) -> tuple[str, str]:
    """Two different prompts of SAME_SHAPE with the same prompt length (the harness's tokenizer, else usage)."""
    lengths: dict[int, str] = {}
    for prompt in SAME_SHAPE:
        ids = ground_truth.prompt_ids([{"role": "user", "content": prompt}])
        if ids is None:
            ids = [0] * capture_client.chat(capture_model, prompt, 1).ok_json()["usage"]["prompt_tokens"]
        if len(ids) in lengths:
            return lengths[len(ids)], prompt
        lengths[len(ids)] = prompt
    raise AssertionError(f"none of {SAME_SHAPE} tokenise to equal lengths ({sorted(lengths)}): the harness needs "
                         f"another pair of equal-length prompts for this tokenizer")


def test_concurrent_requests_of_equal_prompt_length_equal_their_solo_runs(capture_client, capture_model, capture_runs,
                                                                          setting, ground_truth):
    one, other = _equal_length_pair(capture_client, capture_model, ground_truth)
    requests = [
        (f"{one!r}, every savepoint kind, decode", one, _capture(setting, ["head", "first", "last", "input"])),
        (f"{other!r}, every savepoint kind, decode", other, _capture(setting, ["head", "first", "last", "input"])),
        (f"{one!r}, blocks, prefill", one, _capture(setting, ["first", "last"], positions="prompt")),
        (f"{other!r}, blocks and an input, prefill", other,
         _capture(setting, ["first", "last", "input"], positions="prompt")),
    ]
    with watching(capture_client) as seen:
        _round(capture_runs, setting, requests)
    expect_all_clean(seen)


def test_a_repeated_prompt_gets_its_whole_prompt_captured_every_time(capture_client, capture_options, capture_runs,
                                                                     setting):
    if not setting["prompt"]:
        message = (f"no prompt capture: /v1/models capture.features is {setting['features']}, without 'prompt': a "
                   f"shortened prompt capture (prefix cache) cannot be seen in generated positions")
        if capture_options.requires("prompt"):
            pytest.fail(message + " (required: --require-feature prompt, or the bundled server)")
        pytest.skip(message)
    capture = _capture(setting, ["first", "head"], positions="prompt")
    with watching(capture_client) as seen:
        in_a_row = [_send(capture_runs, prompts.STORY, capture) for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:
            at_once = list(pool.map(lambda _: _send(capture_runs, prompts.STORY, capture), range(2)))
    expect_all_clean(seen)
    first = in_a_row[0]
    prompt_len = first.usage.prompt_tokens
    problems = []
    for label, run in (("1st in a row", in_a_row[0]), ("2nd in a row", in_a_row[1]),
                       ("1st of two at once", at_once[0]), ("2nd of two at once", at_once[1])):
        for name, meta in run.meta.items():
            shape = capture_runs.tensor(run, name).shape
            if len(shape) != 3 or shape[1] != prompt_len:
                problems.append(f"{label}: `{name}` holds {list(shape)} for a prompt of {prompt_len} tokens "
                                f"(metadata {meta.shape})")
        if run is not first and not problems:
            problems += _compare(capture_runs, setting, first, run, label)
    assert not problems, ("prompt capture shortened or changed when the same prompt is sent again (a prefix "
                          "cache must not shorten prompt captures): " + "; ".join(problems))
