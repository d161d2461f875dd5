"""The values area's own machinery: the reference pass, the comparison and its diagnoses.

The reference pass is checked against something it does not share code with:
``transformers``' own ``generate`` with ``output_logits``/``output_hidden_states``
(the step-by-step, KV-cached computation the server runs too). The comparison
is checked on synthetic tensors whose right answer is known by construction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capture_conformance.harness.protocol.layout import Layout, layout_from_module
from capture_conformance.harness.protocol.reference import Reference, Site, get_reference, parse_site
from capture_conformance.harness.protocol.values import compare, tolerance_for

PROMPT = [{"role": "user", "content": "Tell me a short story about a fox."}]


@pytest.fixture(scope="module")
def reference(hf_reference, tiny_model_dir):
    model, _ = hf_reference
    return Reference("tiny-qwen3", str(tiny_model_dir), "cpu", "float32", model, layout_from_module(model))


def test_selectors_parse_like_the_protocol_says():
    assert parse_site("model.layers[3]") == Site("model.layers.3", "output")
    assert parse_site("model.layers.3.output") == Site("model.layers.3", "output")
    assert parse_site("model.layers[0].mlp.down_proj.input") == Site("model.layers.0.mlp.down_proj", "input")
    assert parse_site("logits", head="lm_head") == Site("lm_head", "output")
    assert parse_site("logits.input", head="embed_out") == Site("embed_out", "input")  # the model's own head
    assert parse_site("logits") == Site("logits", "output")  # no head known: the alias stays itself
    assert parse_site("model.layers.0.mlp.down_proj.input").label == "model.layers[0].mlp.down_proj.input"
    with pytest.raises(ValueError):
        parse_site("model.layers[0]; import os")


def test_teacher_forced_positions_equal_generate_steps(reference, hf_reference):
    model, tok = hf_reference
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                             output_hidden_states=True, return_dict_in_generate=True)
    new = out.sequences[0, prompt.shape[1]:].tolist()
    sites = [Site("lm_head"), Site("model.layers.0"), Site("model.layers.1", "input")]
    values = reference.values(ids, new, sites)
    p = len(ids)
    assert values[Site("lm_head")].shape == (p + len(new), model.config.vocab_size)
    for i, step_logits in enumerate(out.logits):  # step i <-> position P-1+i
        np.testing.assert_allclose(values[Site("lm_head")][p - 1 + i], step_logits[0].numpy(), rtol=1e-4, atol=1e-4)
        # hidden_states[i][1]: output of layer 0 at step i (= input of layer 1), last position of that step
        np.testing.assert_allclose(values[Site("model.layers.0")][p - 1 + i], out.hidden_states[i][1][0, -1].numpy(),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(values[Site("model.layers.1", "input")][p - 1 + i],
                                   out.hidden_states[i][1][0, -1].numpy(), rtol=1e-4, atol=1e-4)


def test_no_local_model_is_a_reason_not_a_crash(tmp_path):
    status = get_reference("some-org/not-on-this-machine")
    assert not status.available and status.reference is None
    assert "no local copy of 'some-org/not-on-this-machine'" in status.reason and "--reference-model" in status.reason
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    broken = get_reference("x", reference_model=str(tmp_path))
    assert not broken.available and "did not load" in broken.reason


# -- the comparison, on tensors whose right answer is known ----------------------------------------

RNG = np.random.default_rng(0)
P, N, H, V = 6, 4, 16, 40
SITES = {Site("model.layers.0"): RNG.normal(size=(P + N, H)).astype(np.float32),
         Site("model.layers.1"): RNG.normal(size=(P + N, H)).astype(np.float32)}
LOGITS = {Site("lm_head"): (3 * RNG.normal(size=(P + N, V))).astype(np.float32)}
FP32 = tolerance_for("float32", "float32")
# The synthetic model's roles, as the reference's layout would give them.
LAYOUT = Layout(blocks="model.layers", num_blocks=2, head="lm_head", source="synthetic", independent=True,
                final_norm="model.norm", block_mlp="mlp")


def _compare(served, site=Site("model.layers.0"), reference=None, tokens="all", temperature=None):
    return compare(name="x", selector=site.label, tokens=tokens, capture_dtype="float32", served=served[None],
                   site=site, reference=reference or SITES, prompt_len=P, generated=N, tolerance=FP32,
                   temperature=temperature, layout=LAYOUT)


def test_the_right_value_passes_and_names_its_nearest_wrong_candidate():
    right = SITES[Site("model.layers.0")][P - 1 : P - 1 + N]
    result = _compare(right + 1e-6)
    assert result.ok and result.rel_error < 1e-5, result.message()
    assert result.nearest_wrong_error > 0.5 and result.nearest_wrong


def test_a_neighbouring_layer_is_named():
    result = _compare(SITES[Site("model.layers.1")][P - 1 : P - 1 + N])
    assert not result.ok
    assert "matches layer 1 of the reference (`model.layers[1]`)" in result.message()


def test_step_zero_at_the_wrong_position_is_named():
    served = SITES[Site("model.layers.0")][P - 1 : P - 1 + N].copy()
    served[0] = SITES[Site("model.layers.0")][P - 2]
    result = _compare(served)
    assert not result.ok
    assert "step 0 does not match position P-1 of the reference; it matches position P-2" in result.message()


def test_probabilities_and_temperature_scaled_logits_are_named():
    right = LOGITS[Site("lm_head")][P - 1 : P - 1 + N]
    probs = np.exp(right - right.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    result = _compare(probs, Site("lm_head"), LOGITS)
    assert not result.ok and "rows sum to 1" in result.message() and "probabilities" in result.message()
    scaled = _compare(right / 0.7, Site("lm_head"), LOGITS, temperature=0.7)
    assert not scaled.ok and "divided by temperature 0.7" in scaled.message()
    assert _compare(right, Site("lm_head"), LOGITS, temperature=0.7).ok


def test_other_weights_fail_without_a_named_candidate():
    right = SITES[Site("model.layers.0")][P - 1 : P - 1 + N]
    result = _compare(right * 1.03)
    assert not result.ok and "matches no candidate" in result.message()


def test_a_value_as_close_to_a_wrong_candidate_fails_even_within_tolerance():
    # Layer 1 within rounding of layer 0: serving layer 1 for layer 0 is inside the tolerance, but not
    # clearly closer to the right value than to the wrong one, so it fails and says why.
    twin = {Site("model.layers.0"): SITES[Site("model.layers.0")],
            Site("model.layers.1"): SITES[Site("model.layers.0")] * (1 + 1e-4)}
    result = _compare(twin[Site("model.layers.1")][P - 1 : P - 1 + N], reference=twin)
    assert result.rel_error < FP32.rel
    assert not result.ok and "closer to layer 1 of the reference" in result.message()
    between = (twin[Site("model.layers.0")] + twin[Site("model.layers.1")])[P - 1 : P - 1 + N] / 2
    halfway = _compare(between, reference=twin)
    assert not halfway.ok and "cannot tell the right value from a wrong one" in halfway.message()
    assert _compare(twin[Site("model.layers.0")][P - 1 : P - 1 + N], reference=twin).ok


def test_tolerances_follow_the_dtypes_and_the_override():
    assert tolerance_for("float32", "float32").rel < tolerance_for("float32", "bfloat16").rel
    assert tolerance_for("bfloat16", "float32").rel > tolerance_for("float16", "float32").rel
    assert "assumed" in tolerance_for(None, "float32").source
    assert tolerance_for("bfloat16", "bfloat16", 0.5).rel == 0.5


def test_malformed_captures_fail_readably_instead_of_crashing():
    right = SITES[Site("model.layers.0")][P - 1 : P - 1 + N]
    too_many = np.concatenate([right, right, right])  # more steps than completion ids
    result = _compare(too_many)
    assert not result.ok and f"has {3 * N} steps for {N} completion ids" in result.message()
    flat = compare(name="x", selector="model.layers[0]", tokens="all", capture_dtype="float32", served=right,
                   site=Site("model.layers.0"), reference=SITES, prompt_len=P, generated=N, tolerance=FP32)
    assert not flat.ok and "not [1, steps, D]" in flat.message()


def test_the_reference_server_returns_the_prompt_ids_it_fed_the_model(client, hf_reference):
    from conftest import chat_body

    _, tok = hf_reference
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=2, store_activations=True)).json()
    want = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert body["prompt_token_ids"] == list(want)
    assert len(body["prompt_token_ids"]) == body["usage"]["prompt_tokens"]
