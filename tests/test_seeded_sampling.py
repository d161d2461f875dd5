"""Seeded sampling does not depend on other traffic: a random generator per request (issues 19, 20).

``torch.manual_seed`` seeds the generator that every model's worker thread shares, so a seeded
request used to give another answer whenever a second model sampled meanwhile.
"""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from conftest import chat_body, make_client
from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID

SEEDS = (1, 2, 3, 4, 5, 6)
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def two_models(tiny_model_dir, tmp_path_factory):
    """One registry serving the tiny model and a copy of it under another id, each on its own worker."""
    from capture_conformance.reference_server.registry import ModelRegistry

    second = tmp_path_factory.mktemp("second") / "tiny-copy"
    shutil.copytree(tiny_model_dir, second)
    registry = ModelRegistry(device="cpu")
    registry.load(TINY_MODEL_ID)
    registry.load(str(second))
    with make_client(registry, tmp_path_factory.mktemp("storage")) as client:
        assert client.app.state.readiness.ready.wait(30)
        yield client, registry.loaded_id(str(second))
    registry.shutdown()


def _sampled(client, seed, model=TINY_MODEL_ID, max_tokens=24) -> list[int]:
    body = chat_body(max_tokens=max_tokens, temperature=1.0, store_activations=True, model=model,
                     **({"seed": seed} if seed is not None else {}))
    answer = client.post(CHAT, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["completion_token_ids"]


def test_seeded_sampling_equals_its_solo_run_while_a_second_model_samples(two_models):
    client, other = two_models
    solo = {seed: _sampled(client, seed) for seed in SEEDS}
    assert len({tuple(ids) for ids in solo.values()}) > 1, "different seeds gave one answer: not sampling"

    among: dict[int, list[int]] = {}
    done = threading.Event()

    def noisy_neighbour():
        for _ in range(200):  # bounded: stops when the seeded requests are done
            if done.is_set():
                return
            _sampled(client, None, model=other, max_tokens=8)

    neighbours = [threading.Thread(target=noisy_neighbour) for _ in range(2)]
    for thread in neighbours:
        thread.start()
    try:
        seeded = [threading.Thread(target=lambda s=s: among.__setitem__(s, _sampled(client, s))) for s in SEEDS]
        for thread in seeded:
            thread.start()
        for thread in seeded:
            thread.join(120)
    finally:
        done.set()
        for thread in neighbours:
            thread.join(120)
    differing = [s for s in SEEDS if among.get(s) != solo[s]]
    assert not differing, f"seeded answers changed by concurrent traffic on another model: seeds {differing}"


def test_sampling_differs_from_greedy_across_seeds(two_models):
    client, _ = two_models
    greedy = client.post(CHAT, json=chat_body(max_tokens=24, temperature=0, store_activations=True)).json()
    sampled = [_sampled(client, seed) for seed in SEEDS]
    assert any(ids != greedy["completion_token_ids"] for ids in sampled), "temperature 1 answered greedily"


def test_the_per_row_sampler_draws_from_the_softmax():
    """The Gumbel-max sampler's frequencies match softmax(scores), for each row's own generator."""
    from capture_conformance.reference_server.nnsight_core import _SampleWithOwnGenerators

    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    draws = 20000
    generators = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    sampler = _SampleWithOwnGenerators(generators)
    scores = probs.log().expand(2, -1).contiguous() + torch.tensor([[3.0], [-2.0]])  # a shift per row changes nothing
    counts = torch.zeros(2, 4)
    for _ in range(draws):
        picked = sampler(torch.zeros(2, 1, dtype=torch.long), scores).argmax(-1)
        counts[0, picked[0]] += 1
        counts[1, picked[1]] += 1
    frequencies = counts / draws
    # Binomial standard error at p=0.6, n=20000 is 0.0035: 0.015 is over 4 of them.
    torch.testing.assert_close(frequencies, probs.expand(2, -1), atol=0.015, rtol=0)
    assert not torch.equal(counts[0], counts[1]), "two rows drew the same sequence: one generator shared"


def test_the_same_seed_reproduces_the_same_rows_order_independent():
    from capture_conformance.reference_server.nnsight_core import _SampleWithOwnGenerators

    scores = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    first = _SampleWithOwnGenerators([torch.Generator().manual_seed(5)])
    second = _SampleWithOwnGenerators([torch.Generator().manual_seed(5)])
    a = [first(None, scores).argmax(-1).item() for _ in range(30)]
    torch.manual_seed(123)  # the process-wide generator must play no part
    torch.rand(1000)
    b = [second(None, scores).argmax(-1).item() for _ in range(30)]
    assert a == b and len(set(a)) > 1
