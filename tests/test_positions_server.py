"""Prompt and whole-sequence capture (protocol 1.1 ``capture.positions``) against plain transformers."""

from __future__ import annotations

import pytest
import torch

from conftest import chat_body, make_client
from test_reference_values import download

FOX = "Tell me a short story about a fox."
SHORT = "Say OK."  # the tiny model ends this one with EOS after a few tokens
BOTH = ["lm_head", "model.layers[1]"]


def capture(client, content, max_tokens, positions=None, savepoints=BOTH, **extra):
    options = {"savepoints": savepoints, **({"positions": positions} if positions else {}), **extra}
    answer = client.post("/v1/chat/completions", json=chat_body(content, max_tokens, capture=options))
    assert answer.status_code == 200, answer.text
    return answer.json()


def forward(hf_reference, ids: list[int]):
    """One plain forward over ``ids``: logits and layer 1's output at every position."""
    model, _ = hf_reference
    seen = []
    # A hook, not output_hidden_states: its last entry is after the final norm, not layer 1's output.
    handle = model.model.layers[1].register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits
    finally:
        handle.remove()
    return logits, seen[0][0] if isinstance(seen[0], tuple) else seen[0]


def test_sequence_holds_every_prompt_and_completion_position(client, hf_reference):
    """The issue's must-show: [1, P+N, V] and [1, P+N, H]; P-1..P+N-2 are the generated capture."""
    seq = capture(client, FOX, 6, "sequence")
    gen = capture(client, FOX, 6)
    p, n = seq["usage"]["prompt_tokens"], seq["usage"]["completion_tokens"]
    _, tok = hf_reference
    rendered = tok.apply_chat_template([{"role": "user", "content": FOX}], add_generation_prompt=True, tokenize=True)
    rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    assert seq["prompt_token_ids"] == list(rendered) and len(rendered) == p
    assert seq["completion_token_ids"] == gen["completion_token_ids"] and n == 6
    assert seq["activations_meta"]["lm_head"]["shape"] == [1, p + n, 151936]
    assert seq["activations_meta"]["model.layers[1]"]["shape"] == [1, p + n, 256]
    assert seq["activations_meta"]["lm_head"]["positions"] == "sequence"
    assert gen["activations_meta"]["lm_head"]["positions"] == "generated"
    for name in BOTH:
        whole, steps = download(client, seq["activations_meta"][name]), download(client, gen["activations_meta"][name])
        torch.testing.assert_close(whole[:, p - 1:p + n - 1], steps, rtol=1e-4, atol=1e-4, msg=name)
    logits = download(client, seq["activations_meta"]["lm_head"])
    assert logits[0, p - 1:p + n - 1].argmax(-1).tolist() == seq["completion_token_ids"]
    # And every position, the last completion token included, is what transformers computes over the sequence.
    ref_logits, ref_hidden = forward(hf_reference, seq["prompt_token_ids"] + seq["completion_token_ids"])
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(download(client, seq["activations_meta"]["model.layers[1]"]), ref_hidden,
                               rtol=1e-4, atol=1e-4)


def test_prompt_positions_are_a_forward_over_the_prompt(client, hf_reference):
    body = capture(client, FOX, 3, "prompt")
    p = body["usage"]["prompt_tokens"]
    assert len(body["prompt_token_ids"]) == p
    ref_logits, ref_hidden = forward(hf_reference, body["prompt_token_ids"])
    logits = download(client, body["activations_meta"]["lm_head"])
    hidden = download(client, body["activations_meta"]["model.layers[1]"])
    assert logits.shape == (1, p, 151936) and hidden.shape == (1, p, 256)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    assert logits[0, -1].argmax().item() == body["completion_token_ids"][0]


def test_sequence_after_an_early_eos_ends_with_the_eos_position(client, hf_reference):
    body = capture(client, SHORT, 20, "sequence", savepoints=["model.layers[1]"])
    n = body["usage"]["completion_tokens"]
    assert n < 20 and body["choices"][0]["finish_reason"] == "stop", body["completion_token_ids"]
    ids = body["prompt_token_ids"] + body["completion_token_ids"]
    hidden = download(client, body["activations_meta"]["model.layers[1]"])
    assert hidden.shape == (1, len(ids), 256)
    torch.testing.assert_close(hidden, forward(hf_reference, ids)[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions", ["prompt", "sequence"])
@pytest.mark.parametrize("tokens", ["first", "last"])
def test_first_and_last_pick_the_ends_of_the_positions(client, positions, tokens):
    whole = capture(client, FOX, 4, positions, savepoints=["model.layers[1]"])
    one = capture(client, FOX, 4, positions, savepoints=["model.layers[1]"], tokens=tokens)
    full = download(client, whole["activations_meta"]["model.layers[1]"])
    single = download(client, one["activations_meta"]["model.layers[1]"])
    assert single.shape == (1, 1, 256)
    torch.testing.assert_close(single, full[:, :1] if tokens == "first" else full[:, -1:])


def test_batched_sequence_and_prompt_requests_equal_solo_runs(registry):
    from capture_conformance.reference_server.types import GenerationParams, GenerationRequest, PlannedSavepoint
    from capture_conformance.reference_server.selectors import parse_selector

    model = registry.get("tiny-qwen3").model

    plan = [PlannedSavepoint(s, parse_selector(s), model.site(parse_selector(s))) for s in BOTH]
    tok = model.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True)
               for c in (FOX, SHORT)]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    for positions, tokens in (("sequence", "all"), ("prompt", "all"), ("sequence", "last"), ("prompt", "last"),
                              ("generated", "last")):
        requests = [GenerationRequest(p, GenerationParams(m), plan, tokens, positions=positions)
                    for p, m in zip(prompts, (5, 20))]
        assert len({r.batch_key() for r in requests}) == 1
        batched = model.generate_batch(requests)
        for request, got in zip(requests, batched):
            solo = model.generate(request.prompt_ids, request.params, plan, tokens, positions=positions)
            assert got.token_ids == solo.token_ids, positions
            for name in BOTH:
                torch.testing.assert_close(got.tensors[name], solo.tensors[name], rtol=1e-4, atol=1e-4,
                                           msg=f"{positions} {tokens} {name}")


def test_a_streamed_sequence_request_streams_only_the_completion(registry):
    from capture_conformance.reference_server.types import GenerationParams, PlannedSavepoint
    from capture_conformance.reference_server.selectors import parse_selector

    model = registry.get("tiny-qwen3").model
    site = parse_selector("model.layers[0]")
    plan = [PlannedSavepoint("h", site, model.site(site))]
    ids = list(model.tokenizer.apply_chat_template([{"role": "user", "content": SHORT}], add_generation_prompt=True,
                                                   tokenize=True)["input_ids"])
    streamed: list[int] = []
    result = model.generate(ids, GenerationParams(20), plan, on_token=streamed.append, positions="sequence")
    assert streamed == result.token_ids and len(result.token_ids) < 20  # the extra step's token is not streamed
    assert result.tensors["h"].shape == (1, len(ids) + len(streamed), 256)


def test_a_long_prompt_with_logits_is_refused_with_its_size_before_any_work(registry, tmp_path):
    long_prompt = " ".join(["apples and pears"] * 40)
    with make_client(registry, tmp_path / "s", max_capture_mb=20.0) as small:
        body = chat_body(long_prompt, 2, capture={"positions": "prompt"})
        answer = small.post("/v1/chat/completions", json=body)
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        assert "MiB" in detail and "--max-capture-mb" in detail and "P=" in detail, detail
        assert not list((tmp_path / "s").glob("*/manifest.json")), "a refused request left files"
        # The same request for the generated positions is small, and accepted: the limit counts P.
        body["capture"]["positions"] = "generated"
        assert small.post("/v1/chat/completions", json=body).status_code == 200


def test_models_advertise_the_features_and_unknown_positions_are_422(client):
    entry = client.get("/v1/models").json()["data"][0]
    assert {"prompt", "sequence", "streaming"} <= set(entry["capture"]["features"])
    assert client.get("/health").json()["protocol"] == "1.1"
    answer = client.post("/v1/chat/completions", json=chat_body(capture={"positions": "prefix"}))
    assert answer.status_code == 422 and "positions" in answer.text, answer.text


def test_the_last_prompt_position_of_logits_needs_no_prompt_wide_logits(registry, tmp_path):
    """tokens 'last' with prompt positions is step 0's logits: small, allowed where 'first' (all P computed) is not.

    'first' writes one position too (--max-capture-mb counts files), but its forward computes
    all P positions' logits and holds them: the capture budget prices that (issue 20 item 5).
    """
    long_prompt = " ".join(["apples and pears"] * 40)  # 210 tokens: 2 x 122 MiB of logits for 'first'
    with make_client(registry, tmp_path / "s", max_capture_mb=20.0, capture_budget_mb=100.0) as small:
        last = small.post("/v1/chat/completions", json=chat_body(long_prompt, 2, capture={"positions": "prompt", "tokens": "last"}))
        assert last.status_code == 200, last.text
        assert last.json()["activations_meta"]["_logits"]["shape"] == [1, 1, 151936]
        assert download(small, last.json()["activations_meta"]["_logits"])[0, 0].argmax().item() == \
            last.json()["completion_token_ids"][0]
        first = small.post("/v1/chat/completions", json=chat_body(long_prompt, 2, capture={"positions": "prompt", "tokens": "first"}))
        assert first.status_code == 422 and "--capture-budget-mb" in first.text and "logits" in first.text, first.text


@pytest.mark.parametrize("content", [FOX, SHORT])
def test_a_streamed_sequence_capture_streams_the_completion_and_keeps_the_shape(client, content):
    from test_streaming import sse_chunks

    capture_options = {"savepoints": ["model.layers[1]"], "positions": "sequence"}
    plain = capture(client, content, 8, "sequence", savepoints=["model.layers[1]"])
    chunks = sse_chunks(client.post("/v1/chat/completions",
                                    json=chat_body(content, 8, capture=capture_options, stream=True)))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]  # the extra step's token is not streamed
    assert len(chunks) - 2 == plain["usage"]["completion_tokens"]
    final = chunks[-1]
    assert final["completion_token_ids"] == plain["completion_token_ids"]
    assert final["prompt_token_ids"] == plain["prompt_token_ids"]
    p, n = len(plain["prompt_token_ids"]), len(plain["completion_token_ids"])
    assert final["activations_meta"]["model.layers[1]"]["shape"] == [1, p + n, 256]


def test_a_stop_string_ends_a_sequence_capture_where_it_ends_the_generated_one(client):
    full = capture(client, FOX, 16, savepoints=["model.layers[1]"])["choices"][0]["message"]["content"]
    stop = full.split()[3]
    body = {"savepoints": ["model.layers[1]"]}
    plain = client.post("/v1/chat/completions", json=chat_body(FOX, 16, stop=[stop], capture=body)).json()
    seq = client.post("/v1/chat/completions",
                      json=chat_body(FOX, 16, stop=[stop], capture={**body, "positions": "sequence"})).json()
    n = plain["usage"]["completion_tokens"]
    assert n < 16 and seq["completion_token_ids"] == plain["completion_token_ids"]
    assert seq["choices"][0] == plain["choices"][0]
    p = seq["usage"]["prompt_tokens"]
    whole = download(client, seq["activations_meta"]["model.layers[1]"])
    assert whole.shape == (1, p + n, 256)
    torch.testing.assert_close(whole[:, p - 1:p + n - 1], download(client, plain["activations_meta"]["model.layers[1]"]),
                               rtol=1e-4, atol=1e-4)
