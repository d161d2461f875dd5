"""Captured values against plain transformers on the same checkpoint."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load as load_safetensors

from conftest import chat_body

PROMPTS = ["Tell me a short story about a fox.", "Ava has 3 apples and buys 5 more. How many apples does Ava have now?"]


def reference_generate(hf_reference, content: str, max_new_tokens: int):
    model, tok = hf_reference
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
            output_hidden_states=True, return_dict_in_generate=True,
        )
    return ids, out


def download(client, meta: dict) -> torch.Tensor:
    response = client.get(meta["url"])
    assert response.status_code == 200, response.text
    if meta["format"] == "safetensors":
        return next(iter(load_safetensors(response.content).values()))
    return torch.load(io.BytesIO(response.content), weights_only=True)


@pytest.mark.parametrize("content", PROMPTS)
def test_greedy_ids_and_logits_match_transformers(client, hf_reference, content):
    ids, ref = reference_generate(hf_reference, content, 12)
    body = client.post("/v1/chat/completions", json=chat_body(content, 12, capture={"tokens": "all"})).json()
    ref_new = ref.sequences[0, ids.shape[1]:].tolist()
    assert body["completion_token_ids"] == ref_new
    assert body["usage"] == {"prompt_tokens": ids.shape[1], "completion_tokens": len(ref_new),
                             "total_tokens": ids.shape[1] + len(ref_new)}
    logits = download(client, body["activations_meta"]["_logits"])
    ref_logits = torch.stack(ref.logits, dim=1)
    assert logits.shape == ref_logits.shape == (1, len(ref_new), 151936)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert logits[0].argmax(-1).tolist() == body["completion_token_ids"]


def test_hidden_state_savepoints_match_output_hidden_states(client, hf_reference):
    content = PROMPTS[0]
    ids, ref = reference_generate(hf_reference, content, 6)
    n_layers = hf_reference[0].config.num_hidden_layers
    # hidden_states[l] is the input of layer l (output of layer l-1); the last entry is after the final norm.
    savepoints = [
        {"name": "h_in0", "selector": "model.layers[0].input"},
        {"name": "h1", "selector": "model.layers[0]"},
        {"name": "normed", "selector": "lm_head.input"},
        {"name": "mlp_last", "selector": f"model.layers.{n_layers - 1}.mlp"},
    ]
    body = client.post("/v1/chat/completions", json=chat_body(content, 6, capture={"savepoints": savepoints, "format": "safetensors"})).json()
    n = body["usage"]["completion_tokens"]
    expected = {
        "h_in0": torch.stack([step[0][:, -1] for step in ref.hidden_states], dim=1),
        "h1": torch.stack([step[1][:, -1] for step in ref.hidden_states], dim=1),
        "normed": torch.stack([step[n_layers][:, -1] for step in ref.hidden_states], dim=1),
    }
    for name, want in expected.items():
        got = download(client, body["activations_meta"][name])
        assert got.shape == (1, n, 256), name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
    assert body["activations_meta"]["mlp_last"]["shape"] == [1, n, 256]


@pytest.mark.parametrize("tokens,step", [("first", 0), ("last", -1)])
def test_first_and_last_are_steps_of_all(client, tokens, step):
    all_ = client.post("/v1/chat/completions", json=chat_body(max_tokens=7, capture={"tokens": "all"})).json()
    one = client.post("/v1/chat/completions", json=chat_body(max_tokens=7, capture={"tokens": tokens})).json()
    assert one["completion_token_ids"] == all_["completion_token_ids"]
    full = download(client, all_["activations_meta"]["_logits"])
    single = download(client, one["activations_meta"]["_logits"])
    assert single.shape == (1, 1, 151936)
    torch.testing.assert_close(single[0, 0], full[0, step])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_dtype_and_format_are_what_the_metadata_says(client, dtype, fmt):
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=3, capture={"dtype": dtype, "format": fmt})).json()
    meta = body["activations_meta"]["_logits"]
    tensor = download(client, meta)
    assert str(tensor.dtype) == meta["dtype"] == f"torch.{dtype}"
    assert list(tensor.shape) == meta["shape"] and tensor.numel() == meta["numel"]
    assert meta["size_mb"] == round(tensor.numel() * tensor.element_size() / 2**20, 2)
    assert torch.isfinite(tensor.float()).all()


def test_early_eos_gives_fewer_steps(client, hf_reference):
    ids, ref = reference_generate(hf_reference, "Say OK.", 20)
    ref_new = ref.sequences[0, ids.shape[1]:].tolist()
    assert len(ref_new) < 20, "the tiny model should stop early on a short-answer prompt"
    body = client.post("/v1/chat/completions", json=chat_body("Say OK.", 20, store_activations=True)).json()
    assert body["completion_token_ids"] == ref_new
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["activations_meta"]["_logits"]["shape"] == [1, len(ref_new), 151936]


def test_stop_string_ends_generation_and_is_cut_from_text(client):
    full = client.post("/v1/chat/completions", json=chat_body(max_tokens=16)).json()["choices"][0]["message"]["content"]
    stop = full.split()[3]
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=16, stop=[stop], store_activations=True)).json()
    text = body["choices"][0]["message"]["content"]
    assert stop not in text and full.startswith(text)
    assert body["choices"][0]["finish_reason"] == "stop"
    n = body["usage"]["completion_tokens"]
    assert n < 16 and body["activations_meta"]["_logits"]["shape"] == [1, n, 151936]


def test_savepoints_listed_out_of_order_come_back_under_their_names(client):
    forward = [{"name": "a", "selector": "model.layers[0]"}, {"name": "b", "selector": "model.layers[1]"}, {"name": "c", "selector": "logits"}]
    one = client.post("/v1/chat/completions", json=chat_body(max_tokens=4, capture={"savepoints": forward})).json()
    two = client.post("/v1/chat/completions", json=chat_body(max_tokens=4, capture={"savepoints": forward[::-1]})).json()
    assert one["completion_token_ids"] == two["completion_token_ids"]
    for name in "abc":
        torch.testing.assert_close(download(client, one["activations_meta"][name]), download(client, two["activations_meta"][name]))
    assert not torch.equal(download(client, one["activations_meta"]["a"]), download(client, one["activations_meta"]["b"]))


def test_seeded_sampling_is_reproducible_and_stays_in_vocabulary(client, hf_reference):
    body = chat_body(max_tokens=8, temperature=1.2, top_p=0.9, seed=7, store_activations=True)
    first = client.post("/v1/chat/completions", json=body).json()
    second = client.post("/v1/chat/completions", json=body).json()
    assert first["completion_token_ids"] == second["completion_token_ids"]
    assert max(first["completion_token_ids"]) < len(hf_reference[1])


def test_pure_nnsight_uses_the_raw_prompt(client, hf_reference):
    model, tok = hf_reference
    body = client.post("/test_pure_nnsight", json={"prompt": "Once upon a time", "max_new_tokens": 3}).json()
    assert body["success"] is True
    assert body["logits_shape"] == [1, 3, 151936] and body["logits_dtype"] == "torch.float32"
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert body["generated_text"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
