"""Batched generation: each request's result equals its solo run."""

from __future__ import annotations

import asyncio
import threading

import torch

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID
from capture_conformance.reference_server import chat
from capture_conformance.reference_server.types import GenerationParams, GenerationRequest, PlannedSavepoint
from capture_conformance.reference_server.selectors import parse_selector


def request(model, content, max_tokens, selectors, tokens="all", dtype=torch.float32, **params):
    prompt = chat.render_prompt(model.tokenizer, [{"role": "user", "content": content}])
    plan = [PlannedSavepoint(s, parse_selector(s), model.site(parse_selector(s))) for s in selectors]
    return GenerationRequest(prompt, GenerationParams(max_new_tokens=max_tokens, **params), plan, tokens, dtype)


def test_queued_greedy_requests_share_one_generate_and_equal_their_solo_runs(registry):
    worker = registry.get(TINY_MODEL_ID)
    model = worker.model
    requests = [
        request(model, "Tell me a short story about a fox.", 9, ["lm_head", "model.layers[1]"]),
        request(model, "Say OK.", 12, ["lm_head"]),  # ends with EOS while the others go on
        request(model, "Ben had 40 coins and gave away 12. How many coins are left?", 5, ["model.layers[0].input", "lm_head"]),
        request(model, "Count to three.", 7, ["lm_head"], tokens="last"),
        request(model, "Tell me a short story about a dragon.", 6, ["lm_head"], tokens="first", dtype=torch.bfloat16),
        request(model, "Name a colour.", 4, []),  # no capture at all
    ]
    solo = [model.generate_batch([r])[0] for r in requests]
    release = threading.Event()

    async def scenario():
        blocker = asyncio.ensure_future(worker.run(release.wait, 30))
        await asyncio.sleep(0.05)  # the blocker now holds the worker thread
        pending = [asyncio.ensure_future(worker.generate(r)) for r in requests]
        await asyncio.sleep(0.05)
        release.set()
        await blocker
        return await asyncio.gather(*pending)

    batched = asyncio.run(scenario())
    assert worker.batches_run[-1] == len(requests), f"not served as one batch: {worker.batches_run[-3:]}"
    assert len(solo[1].token_ids) < 12 and solo[1].hit_eos
    for alone, together, req in zip(solo, batched, requests):
        assert together.token_ids == alone.token_ids
        assert together.hit_eos == alone.hit_eos
        assert together.tensors.keys() == alone.tensors.keys()
        for name in alone.tensors:
            assert together.tensors[name].shape == alone.tensors[name].shape, name
            assert together.tensors[name].dtype == req.capture_dtype
            torch.testing.assert_close(together.tensors[name].float(), alone.tensors[name].float(), rtol=1e-3, atol=1e-3)


def test_sampled_and_stop_requests_are_never_batched(registry):
    model = registry.get(TINY_MODEL_ID).model
    assert request(model, "x", 3, [], temperature=0.7).batch_key() is None
    assert request(model, "x", 3, [], stop=("a",)).batch_key() is None
    assert request(model, "x", 3, []).batch_key() == request(model, "y", 9, ["lm_head"]).batch_key()


def test_half_precision_models_batch_only_when_asked():
    from types import SimpleNamespace

    from capture_conformance.reference_server.registry import AUTO_MAX_BATCH, batch_size_for

    def model(dtype):
        return SimpleNamespace(info=SimpleNamespace(dtype=dtype))

    assert batch_size_for(model("float32"), None) == AUTO_MAX_BATCH > 1
    assert batch_size_for(model("bfloat16"), None) == 1 and batch_size_for(model("float16"), None) == 1
    assert batch_size_for(model("bfloat16"), 8) == 8 and batch_size_for(model("float32"), 1) == 1
