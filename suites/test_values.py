"""Area values: every captured number against an independent forward pass of the same checkpoint.

The reference (``harness/reference.py``) is the model loaded with plain
transformers, run once per request over the prompt ids followed by the
completion ids; step i of a capture is its value at position P-1+i. Each
comparison states its relative error next to the nearest wrong candidate
(neighbouring layer, one position off, softmax of the logits, ...) and fails
when the served tensor is not clearly closest to the right value, saying what
it looks like instead. Without a reference (light install, model not local)
the comparisons are skipped as "values not verifiable: <reason>" and the
report's capture level says shapes only.
"""

from __future__ import annotations

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.checks import expect_token_counts

pytestmark = pytest.mark.area("values")

STEPS = 5


def _named(**selectors: str) -> list[dict]:
    return [{"name": name, "selector": selector} for name, selector in selectors.items()]


def _layers(layout) -> list[int]:
    """Every decoder layer of a small model; first, second, middle, last two of a deep one."""
    count = layout.num_blocks
    if count <= 6:
        return list(range(count))
    return sorted({0, 1, count // 2, count - 2, count - 1})


def test_logits_match_the_reference(capture_runs, value_checks):
    value_checks.require()
    completion = capture_runs.capture(prompts.STORY, STEPS, savepoints=_named(_logits="logits"))
    expect_token_counts(completion, expected_steps=STEPS)
    value_checks.check(completion)


def test_store_activations_logits_match_the_reference(capture_runs, value_checks):
    value_checks.require()
    completion = capture_runs.chat(prompts.STORY, STEPS, store_activations=True)
    value_checks.check(completion, ["_logits"])


def test_decoder_layer_outputs_match_the_reference(capture_runs, model_layout, value_checks):
    value_checks.require()
    layers = _layers(model_layout)
    completion = capture_runs.capture(prompts.STORY, STEPS,
                                      savepoints=_named(**{f"layer_{i}": model_layout.block(i) for i in layers}))
    value_checks.check(completion)


def test_inputs_match_the_reference(capture_runs, model_layout, value_checks):
    value_checks.require()
    layout = model_layout
    completion = capture_runs.capture(prompts.STORY, STEPS, savepoints=_named(
        layer_0_input=layout.block(0, io="input"), layer_last_input=layout.block(layout.last, io="input"),
        head_input=f"{layout.head}.input"))
    value_checks.check(completion)


def _submodules(layout) -> dict[str, str]:
    """Block 0's MLP, down projection input and first norm, where the family has them."""
    wanted = {"mlp": layout.block_dotted(0, layout.block_mlp) if layout.block_mlp else None,
              "down_proj_input": layout.block(0, layout.block_down_proj, io="input") if layout.block_down_proj else None,
              "attn_norm": layout.block(0, layout.block_norm) if layout.block_norm else None}
    return {name: selector for name, selector in wanted.items() if selector}


def test_submodules_match_the_reference(capture_runs, model_layout, value_checks):
    value_checks.require()
    wanted = _submodules(model_layout)
    if not wanted:
        pytest.skip(f"no block submodule discovered in the model ({model_layout.source})")
    completion = capture_runs.capture(prompts.STORY, STEPS, savepoints=_named(**wanted))
    value_checks.check(completion)


@pytest.mark.parametrize("tokens", ["first", "last"])
def test_first_and_last_match_their_positions(capture_runs, model_layout, value_checks, tokens):
    value_checks.require()
    completion = capture_runs.capture(prompts.STORY, STEPS, tokens=tokens, savepoints=_named(
        _logits="logits", layer_0=model_layout.block(0), layer_last=model_layout.block(model_layout.last)))
    value_checks.check(completion)


@pytest.mark.parametrize("dtype,file_format", [
    ("float32", "safetensors"), ("bfloat16", "pt"), ("float16", "safetensors"),
    # the rest of the matrix (float32-pt is every other test here) with --profile full
    pytest.param("bfloat16", "safetensors", marks=pytest.mark.full),
    pytest.param("float16", "pt", marks=pytest.mark.full),
])
def test_capture_dtypes_and_formats_keep_the_values(capture_runs, model_layout, value_checks, dtype, file_format):
    value_checks.require()
    completion = capture_runs.capture(prompts.STORY, STEPS, dtype=dtype, file_format=file_format,
                                      savepoints=_named(_logits="logits", layer_0=model_layout.block(0)))
    for meta in completion.meta.values():
        assert meta.dtype == f"torch.{dtype}", f"`{meta.name}` is {meta.dtype}, asked for {dtype}"
    value_checks.check(completion)


def test_sampled_request_values_match_the_ids_it_returned(capture_runs, model_layout, ground_truth, value_checks):
    # The reference uses the ids the server sampled: a sampled capture is checkable too.
    value_checks.require()
    completion = capture_runs.capture(prompts.STORY, STEPS, temperature=0.7, top_p=1.0, seed=11,
                                      savepoints=_named(_logits="logits", layer_0=model_layout.block(0)))
    value_checks.check(completion)


def test_early_eos_values_match_the_reference(capture_runs, model_layout, ground_truth, value_checks):
    value_checks.require()
    completion = capture_runs.capture(prompts.SHORT_ANSWER, 16, savepoints=_named(
        _logits="logits", layer_0=model_layout.block(0)))
    n = expect_token_counts(completion)
    assert n >= 1, f"no token generated for {prompts.SHORT_ANSWER!r}"
    value_checks.check(completion)


def test_capture_does_not_change_generation(capture_runs, model_layout):
    """No capture, ``_logits`` only, many savepoints: the same greedy request, the same ids and text."""
    layout = model_layout
    many = _named(_logits="logits", head_input=f"{layout.head}.input", layer_0=layout.block(0),
                  layer_0_input=layout.block(0, io="input"), layer_last=layout.block(layout.last),
                  **{k: v for k, v in _submodules(layout).items() if k != "attn_norm"})
    plain = capture_runs.chat(prompts.STORY, 8, cached=False)
    logits_only = capture_runs.chat(prompts.STORY, 8, store_activations=True, cached=False)
    loaded = capture_runs.capture(prompts.STORY, 8, savepoints=many, cached=False)
    texts = {"no capture": plain.content, "_logits only": logits_only.content, "many savepoints": loaded.content}
    assert len(set(texts.values())) == 1, f"capture changed the generated text: {texts}"
    assert logits_only.token_ids == loaded.token_ids, (
        f"capture changed the generated ids: _logits only {logits_only.token_ids} vs many savepoints "
        f"{loaded.token_ids}")
    assert plain.usage.completion_tokens == len(loaded.token_ids), (
        f"no capture generated {plain.usage.completion_tokens} tokens, with capture {len(loaded.token_ids)}")
