"""Area savepoints: decoder layers, ``.input``, several savepoints at once, each under its own name.

Selectors use the protocol's grammar only (dots, ``[i]``, ``.input``/``.output``,
the ``logits`` alias) over the usual decoder layout ``model.layers[i]``.
"""

from __future__ import annotations

import re

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.checks import (
    expect_argmax_matches,
    expect_close,
    expect_different,
    expect_shape,
    expect_token_counts,
    rounding_tolerance,
)

pytestmark = pytest.mark.area("savepoints")

STEPS = 5
TOL = rounding_tolerance("float32")


def _last_layer(ground_truth) -> int:
    return (ground_truth.num_layers or 2) - 1


def _normal(selector: str) -> str:
    """``model.layers[0].output`` and ``model.layers.0`` name the same thing."""
    return re.sub(r"\[(\d+)\]", r".\1", selector).removesuffix(".output")


def _capture(capture_runs, savepoints, tokens="all", steps=STEPS):
    completion = capture_runs.capture(prompts.STORY, steps, savepoints=savepoints, tokens=tokens)
    return completion, expect_token_counts(completion, expected_steps=steps)


def _named(**selectors: str) -> list[dict]:
    return [{"name": name, "selector": selector} for name, selector in selectors.items()]


@pytest.mark.smoke
def test_decoder_layer_outputs_are_one_hidden_vector_per_step(capture_runs, ground_truth):
    last = _last_layer(ground_truth)
    completion, n = _capture(capture_runs, _named(layer_first="model.layers[0]", layer_last=f"model.layers[{last}]"))
    for name in ("layer_first", "layer_last"):
        expect_shape(completion.savepoint(name), [1, n, ground_truth.hidden_size], ground_truth, steps=n,
                     context=f"decoder layer output `{name}`")


def test_a_layers_input_is_the_previous_layers_output(capture_runs, ground_truth):
    if (ground_truth.num_layers or 2) < 2:
        pytest.skip("the model has a single decoder layer")
    completion, n = _capture(capture_runs, _named(out_0="model.layers[0]", in_1="model.layers[1].input"))
    for name in ("out_0", "in_1"):
        expect_shape(completion.savepoint(name), [1, n, ground_truth.hidden_size], ground_truth, steps=n,
                     context=f"`{name}`")
    expect_close(capture_runs.tensor(completion, "in_1").values, capture_runs.tensor(completion, "out_0").values,
                 what="model.layers[1].input vs model.layers[0] output", rtol=TOL[0], atol=TOL[1])


def test_savepoints_out_of_execution_order_come_back_under_their_own_names(capture_runs, ground_truth):
    last = _last_layer(ground_truth)
    # Listed backwards through the model: the head first, the first layer last. Several
    # savepoints share a width (H), so a mix-up of names cannot hide behind the shapes:
    # layer 0's input and output differ, and layer 1's input must equal layer 0's output.
    wanted = _named(head="lm_head", head_input="lm_head.input", layer_last=f"model.layers[{last}]",
                    layer_1_input="model.layers[1].input", layer_0="model.layers[0]",
                    layer_0_input="model.layers[0].input")
    completion, n = _capture(capture_runs, wanted)
    meta = completion.meta
    assert sorted(meta) == sorted(w["name"] for w in wanted), (
        f"asked for savepoints {[w['name'] for w in wanted]}, got {sorted(meta)}")
    for item in wanted:
        got = meta[item["name"]].raw.get("selector")
        assert isinstance(got, str) and _normal(got) == _normal(item["selector"]), (
            f"savepoint {item['name']!r} was asked for {item['selector']!r}, metadata says selector {got!r}")
    V, H = ground_truth.vocab_size, ground_truth.hidden_size
    for name, width in (("head", V), ("head_input", H), ("layer_last", H), ("layer_1_input", H), ("layer_0", H),
                        ("layer_0_input", H)):
        expect_shape(meta[name], [1, n, width], ground_truth, steps=n, context=f"savepoint `{name}`")
    values = {name: capture_runs.tensor(completion, name).values for name in meta}
    expect_argmax_matches(capture_runs.tensor(completion, "head"), completion.token_ids, name="head (lm_head)")
    expect_close(values["layer_1_input"], values["layer_0"], what="layer_1_input vs layer_0 (names swapped?)",
                 rtol=TOL[0], atol=TOL[1])
    expect_different(values["layer_0_input"], values["layer_0"], what="layer_0_input vs layer_0 (names swapped?)")
    if last > 0:
        expect_different(values["layer_0"], values["layer_last"], what="layer_0 vs layer_last")

    # Listed in execution order, the same request must give the same tensor under each name.
    in_order, _ = _capture(capture_runs, list(reversed(wanted)))
    for name in meta:
        expect_close(capture_runs.tensor(in_order, name).values, values[name],
                     what=f"`{name}` listed in execution order vs reversed", rtol=TOL[0], atol=TOL[1])


def test_logits_alias_equals_lm_head(capture_runs, ground_truth):
    completion, n = _capture(capture_runs, _named(via_alias="logits", via_module="lm_head"))
    for name in ("via_alias", "via_module"):
        expect_shape(completion.savepoint(name), [1, n, ground_truth.vocab_size], ground_truth, steps=n,
                     context=f"`{name}`")
    expect_close(capture_runs.tensor(completion, "via_alias").values,
                 capture_runs.tensor(completion, "via_module").values,
                 what="selector 'logits' vs 'lm_head'", rtol=TOL[0], atol=TOL[1])


def test_plain_selector_strings_are_accepted(capture_runs, ground_truth):
    completion, n = _capture(capture_runs, ["lm_head", "model.layers.0"])
    head = completion.savepoint_by_selector("lm_head")
    layer = completion.savepoint_by_selector("model.layers.0")
    expect_shape(head, [1, n, ground_truth.vocab_size], ground_truth, steps=n, context="plain selector 'lm_head'")
    expect_shape(layer, [1, n, ground_truth.hidden_size], ground_truth, steps=n,
                 context="plain selector 'model.layers.0'")


def test_submodule_widths(capture_runs, ground_truth):
    wanted = {"mlp": ("model.layers.0.mlp", ground_truth.hidden_size)}
    if ground_truth.intermediate_size:
        wanted["down_proj_input"] = ("model.layers[0].mlp.down_proj.input", ground_truth.intermediate_size)
    completion, n = _capture(capture_runs, _named(**{k: v[0] for k, v in wanted.items()}))
    for name, (selector, width) in wanted.items():
        expect_shape(completion.savepoint(name), [1, n, width], ground_truth, steps=n, context=f"{selector}")


@pytest.mark.parametrize("tokens", ["first", "last"])
def test_layer_savepoints_honour_tokens(capture_runs, ground_truth, tokens):
    savepoints = _named(layer_0="model.layers[0]")
    whole, n = _capture(capture_runs, savepoints, tokens="all")
    part, _ = _capture(capture_runs, savepoints, tokens=tokens)
    expect_shape(part.savepoint("layer_0"), [1, 1, ground_truth.hidden_size], ground_truth, steps=n,
                 context=f"tokens: {tokens}")
    step = 0 if tokens == "first" else n - 1
    expect_close(capture_runs.tensor(part, "layer_0").values,
                 capture_runs.tensor(whole, "layer_0").values[:, step : step + 1],
                 what=f"tokens {tokens!r} vs step {step} of 'all'", rtol=TOL[0], atol=TOL[1])


def test_savepoint_capture_matches_snapshot(capture_runs, ground_truth, shape_snapshot):
    last = _last_layer(ground_truth)
    completion, _ = _capture(capture_runs, _named(head="lm_head", head_input="lm_head.input",
                                                  layer_last=f"model.layers[{last}]", layer_0="model.layers[0]"))
    shape_snapshot.check(completion)
