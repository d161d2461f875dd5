"""The hooked fast path (nnsight_core.CaptureModel._hooked) equals the nnsight trace, value for value.

Each case runs the same request twice on the same model, once through forward hooks on
plain ``generate`` and once through the general nnsight trace (``fast_path = False``),
and compares ids and every tensor bitwise (``torch.equal``: same shape, dtype and bits).
A spy records which path served each call, so a case that silently fell back to nnsight
(and so compared nnsight with itself) fails, and so does a fallback case that did not.
"""

from __future__ import annotations

import pytest
import torch

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID
from capture_conformance.reference_server import chat, nnsight_core
from capture_conformance.reference_server.selectors import parse_selector
from capture_conformance.reference_server.types import GenerationParams, GenerationRequest, PlannedSavepoint

FOX = "Tell me a short story about a fox."


@pytest.fixture
def model(registry):
    return registry.get(TINY_MODEL_ID).model


@pytest.fixture
def paths_taken(monkeypatch):
    """Which path served each generate: 'hooks' or 'nnsight'."""
    taken: list[str] = []
    hooked, traced = nnsight_core.CaptureModel._hooked, nnsight_core.CaptureModel._traced

    def spy_hooked(self, *args, **kwargs):
        taken.append("hooks")
        return hooked(self, *args, **kwargs)

    def spy_traced(self, requests):
        before = len(taken)
        result = traced(self, requests)
        if len(taken) == before:
            taken.append("nnsight")
        return result

    monkeypatch.setattr(nnsight_core.CaptureModel, "_hooked", spy_hooked)
    monkeypatch.setattr(nnsight_core.CaptureModel, "_traced", spy_traced)
    return taken


def plan(model, selectors):
    out = []
    for i, text in enumerate(selectors):
        selector = parse_selector(text, model.aliases)
        out.append(PlannedSavepoint(f"sp{i}", selector, model.site(selector)))
    return out


def both_paths(model, paths_taken, content, selectors, max_tokens=6, tokens="all", positions="generated",
               dtype=torch.float32, **params):
    prompt = chat.render_prompt(model.tokenizer, [{"role": "user", "content": content}])
    results = {}
    for fast in (True, False):
        model.fast_path = fast
        try:
            results[fast] = model.generate(prompt, GenerationParams(max_new_tokens=max_tokens, **params),
                                           plan(model, selectors), tokens=tokens, capture_dtype=dtype,
                                           positions=positions)
        finally:
            del model.fast_path  # back to the class default
    return results[True], results[False], paths_taken[-2:]


def assert_bitwise_equal(fast, general):
    assert fast.token_ids == general.token_ids
    assert fast.hit_eos == general.hit_eos
    assert fast.tensors.keys() == general.tensors.keys() and general.tensors
    for name, want in general.tensors.items():
        got = fast.tensors[name]
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
        assert torch.equal(got, want), f"{name}: max |diff| {(got.float() - want.float()).abs().max()}"


CASES = [
    # (selectors, tokens, positions, dtype, params)
    (["lm_head"], "all", "generated", torch.float32, {}),
    (["lm_head", "model.layers[0]", "model.layers[1]"], "all", "generated", torch.float32, {}),
    (["model.layers[1].self_attn", "model.norm", "lm_head"], "all", "prompt", torch.float32, {}),
    (["lm_head", "model.layers[0].mlp"], "all", "sequence", torch.bfloat16, {}),
    (["lm_head"], "last", "generated", torch.float32, {}),
    (["lm_head"], "last", "sequence", torch.float32, {}),
    (["lm_head", "model.layers[1]"], "first", "prompt", torch.float16, {}),
    (["lm_head"], "all", "generated", torch.float32, {"temperature": 0.9, "seed": 7}),
    (["lm_head"], "all", "generated", torch.float32, {"stop": ("the",)}),
]


@pytest.mark.parametrize("selectors,tokens,positions,dtype,params", CASES,
                         ids=[f"{'+'.join(c[0])}-{c[1]}-{c[2]}-{str(c[3])[6:]}{'-' + ','.join(c[4]) if c[4] else ''}"
                              for c in CASES])
def test_fast_path_equals_nnsight_bitwise(model, paths_taken, selectors, tokens, positions, dtype, params):
    fast, general, taken = both_paths(model, paths_taken, FOX, selectors, tokens=tokens, positions=positions,
                                      dtype=dtype, **params)
    assert taken == ["hooks", "nnsight"]
    assert_bitwise_equal(fast, general)


def test_fast_path_equals_nnsight_when_eos_ends_early(model, paths_taken):
    fast, general, taken = both_paths(model, paths_taken, "Say OK.", ["lm_head", "model.layers[1]"], max_tokens=12)
    assert taken == ["hooks", "nnsight"]
    assert general.hit_eos and len(general.token_ids) < 12  # the case this test is about
    assert_bitwise_equal(fast, general)


@pytest.mark.parametrize("selectors", [["model.layers[0].input"], ["lm_head", "model.layers[1].mlp.down_proj.input"]])
def test_module_inputs_fall_back_to_nnsight(model, paths_taken, selectors):
    fast, general, taken = both_paths(model, paths_taken, FOX, selectors, max_tokens=3)
    assert taken == ["nnsight", "nnsight"]
    assert_bitwise_equal(fast, general)


def test_a_module_run_twice_per_forward_falls_back(model, paths_taken, monkeypatch):
    """A hook would see both calls of a module that runs twice; nnsight's .output is its first: not covered."""
    monkeypatch.setattr(model, "_called_once", model._called_once - {"model.norm"})
    _, _, taken = both_paths(model, paths_taken, FOX, ["model.norm"], max_tokens=2)
    assert taken == ["nnsight", "nnsight"]
    assert "lm_head" in model._called_once and "model.layers.0" in model._called_once


def test_batches_use_nnsight_and_a_solo_run_the_hooks(model, paths_taken):
    prompt = chat.render_prompt(model.tokenizer, [{"role": "user", "content": FOX}])
    requests = [GenerationRequest(prompt, GenerationParams(max_new_tokens=3), plan(model, ["lm_head"])),
                GenerationRequest(prompt[:-2], GenerationParams(max_new_tokens=3), plan(model, ["lm_head"]))]
    batched = model.generate_batch(requests)
    solo = model.generate_batch(requests[:1])
    assert paths_taken == ["nnsight", "hooks"]
    assert batched[0].token_ids == solo[0].token_ids
    torch.testing.assert_close(batched[0].tensors["sp0"], solo[0].tensors["sp0"], rtol=1e-4, atol=1e-4)


def test_hooks_are_removed_after_each_request(model, paths_taken):
    head = model._module.get_submodule("lm_head")
    before = dict(head._forward_hooks)
    both_paths(model, paths_taken, FOX, ["lm_head"], max_tokens=2)
    assert dict(head._forward_hooks) == before
