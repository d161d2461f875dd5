"""Area savepoints: decoder layers, ``.input``, several savepoints at once, each under its own name.

Selectors use the protocol's grammar only (dots, ``[i]``, ``.input``/``.output``,
the ``logits`` alias) over the savepoints ``model_layout`` discovered in the model
itself: no module name is assumed.
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


def _normal(selector: str) -> str:
    """``blocks[0].output`` and ``blocks.0`` name the same thing."""
    return re.sub(r"\[(\d+)\]", r".\1", selector).removesuffix(".output")


def _capture(capture_runs, savepoints, tokens="all", steps=STEPS):
    completion = capture_runs.capture(prompts.STORY, steps, savepoints=savepoints, tokens=tokens)
    return completion, expect_token_counts(completion, expected_steps=steps)


def _named(**selectors: str) -> list[dict]:
    return [{"name": name, "selector": selector} for name, selector in selectors.items()]


@pytest.mark.smoke
def test_decoder_layer_outputs_are_one_hidden_vector_per_step(capture_runs, ground_truth, model_layout):
    completion, n = _capture(capture_runs, _named(layer_first=model_layout.block(0),
                                                  layer_last=model_layout.block(model_layout.last)))
    for name in ("layer_first", "layer_last"):
        expect_shape(completion.savepoint(name), [1, n, ground_truth.hidden_size], ground_truth, steps=n,
                     context=f"decoder layer output `{name}`")


def test_a_layers_input_is_the_previous_layers_output(capture_runs, ground_truth, model_layout):
    if model_layout.num_blocks < 2:
        pytest.skip("the model has a single decoder layer")
    in_1 = model_layout.block(1, io="input")
    completion, n = _capture(capture_runs, _named(out_0=model_layout.block(0), in_1=in_1))
    for name in ("out_0", "in_1"):
        expect_shape(completion.savepoint(name), [1, n, ground_truth.hidden_size], ground_truth, steps=n,
                     context=f"`{name}`")
    expect_close(capture_runs.tensor(completion, "in_1").values, capture_runs.tensor(completion, "out_0").values,
                 what=f"{in_1} vs {model_layout.block(0)} output", rtol=TOL[0], atol=TOL[1])


def test_savepoints_out_of_execution_order_come_back_under_their_own_names(capture_runs, ground_truth, model_layout):
    layout, last = model_layout, model_layout.last
    # Listed backwards through the model: the head first, the first layer last. Several
    # savepoints share a width (H), so a mix-up of names cannot hide behind the shapes:
    # layer 0's input and output differ, and layer 1's input must equal layer 0's output.
    wanted = _named(head=layout.head, head_input=f"{layout.head}.input", layer_last=layout.block(last),
                    layer_1_input=layout.block(min(1, last), io="input"), layer_0=layout.block(0),
                    layer_0_input=layout.block(0, io="input"))
    completion, n = _capture(capture_runs, wanted)
    meta = completion.meta
    assert sorted(meta) == sorted(w["name"] for w in wanted), (
        f"asked for savepoints {[w['name'] for w in wanted]}, got {sorted(meta)}")
    for item in wanted:
        got = meta[item["name"]].raw.get("selector")
        assert isinstance(got, str) and _normal(layout.canonical(got)) == _normal(layout.canonical(item["selector"])), (
            f"savepoint {item['name']!r} was asked for {item['selector']!r}, metadata says selector {got!r}")
    V, H = ground_truth.vocab_size, ground_truth.hidden_size
    for name, width in (("head", V), ("head_input", H), ("layer_last", H), ("layer_1_input", H), ("layer_0", H),
                        ("layer_0_input", H)):
        expect_shape(meta[name], [1, n, width], ground_truth, steps=n, context=f"savepoint `{name}`")
    values = {name: capture_runs.tensor(completion, name).values for name in meta}
    expect_argmax_matches(capture_runs.tensor(completion, "head"), completion.token_ids, name=f"head ({layout.head})")
    if last > 0:
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


def test_logits_alias_equals_the_head_module(capture_runs, ground_truth, model_layout):
    if model_layout.head == "logits":
        pytest.skip(f"which module is the head is not known ({model_layout.source}): give the harness a local "
                    f"copy of the model to compare the alias with it")
    completion, n = _capture(capture_runs, _named(via_alias="logits", via_module=model_layout.head))
    for name in ("via_alias", "via_module"):
        expect_shape(completion.savepoint(name), [1, n, ground_truth.vocab_size], ground_truth, steps=n,
                     context=f"`{name}`")
    expect_close(capture_runs.tensor(completion, "via_alias").values,
                 capture_runs.tensor(completion, "via_module").values,
                 what=f"selector 'logits' vs {model_layout.head!r}", rtol=TOL[0], atol=TOL[1])


def test_plain_selector_strings_are_accepted(capture_runs, ground_truth, model_layout):
    head_selector, layer_selector = model_layout.head, model_layout.block_dotted(0)
    completion, n = _capture(capture_runs, [head_selector, layer_selector])
    head = completion.savepoint_by_selector(head_selector)
    layer = completion.savepoint_by_selector(layer_selector)
    expect_shape(head, [1, n, ground_truth.vocab_size], ground_truth, steps=n,
                 context=f"plain selector {head_selector!r}")
    expect_shape(layer, [1, n, ground_truth.hidden_size], ground_truth, steps=n,
                 context=f"plain selector {layer_selector!r}")


def test_submodule_widths(capture_runs, ground_truth, model_layout):
    wanted = {}
    if model_layout.block_mlp:  # OPT's blocks hold fc1/fc2 themselves: no MLP module to capture
        wanted["mlp"] = (model_layout.block_dotted(0, model_layout.block_mlp), ground_truth.hidden_size)
    if ground_truth.intermediate_size and model_layout.block_down_proj:
        wanted["down_proj_input"] = (model_layout.block(0, model_layout.block_down_proj, io="input"),
                                     ground_truth.intermediate_size)
    if not wanted:
        pytest.skip(f"no block submodule discovered ({model_layout.source})")
    completion, n = _capture(capture_runs, _named(**{k: v[0] for k, v in wanted.items()}))
    for name, (selector, width) in wanted.items():
        expect_shape(completion.savepoint(name), [1, n, width], ground_truth, steps=n, context=f"{selector}")


@pytest.mark.parametrize("tokens", ["first", "last"])
def test_layer_savepoints_honour_tokens(capture_runs, ground_truth, model_layout, tokens):
    savepoints = _named(layer_0=model_layout.block(0))
    whole, n = _capture(capture_runs, savepoints, tokens="all")
    part, _ = _capture(capture_runs, savepoints, tokens=tokens)
    expect_shape(part.savepoint("layer_0"), [1, 1, ground_truth.hidden_size], ground_truth, steps=n,
                 context=f"tokens: {tokens}")
    step = 0 if tokens == "first" else n - 1
    expect_close(capture_runs.tensor(part, "layer_0").values,
                 capture_runs.tensor(whole, "layer_0").values[:, step : step + 1],
                 what=f"tokens {tokens!r} vs step {step} of 'all'", rtol=TOL[0], atol=TOL[1])


def test_savepoint_capture_matches_snapshot(capture_runs, model_layout, shape_snapshot):
    layout = model_layout
    completion, _ = _capture(capture_runs, _named(head=layout.head, head_input=f"{layout.head}.input",
                                                  layer_last=layout.block(layout.last), layer_0=layout.block(0)))
    shape_snapshot.check(completion)
