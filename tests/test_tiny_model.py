"""The embedded model must make the suites' value checks meaningful."""

from __future__ import annotations

import torch

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID, corpus_rows, resolve_model_path

PROMPTS = ["Tell me a short story about a fox.", "Ava has 3 apples and buys 5 more. How many apples does Ava have now?",
           "What is the meaning of life?", "Explain rain to a child.", "Count to three.", "Name a colour."]


def greedy(hf_reference, content, n=16):
    model, tok = hf_reference
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


def test_shape_of_the_familiar_qwen3_vocabulary(hf_reference):
    model, tok = hf_reference
    assert model.config.vocab_size == 151936 and model.config.model_type == "qwen3"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size > 128  # > 128: truncation is visible
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)


def test_greedy_output_is_varied_prompt_dependent_and_in_vocabulary(hf_reference):
    outputs = [greedy(hf_reference, p) for p in PROMPTS]
    vocab = len(hf_reference[1])
    assert all(0 <= i < vocab for out in outputs for i in out)
    # The model memorised its corpus: prompts unlike it fall into a few answer modes,
    # so "mostly distinct" is the honest bar; in-corpus prompts are all distinct.
    assert len({tuple(o) for o in outputs}) >= 4, f"outputs hardly depend on the prompt: {outputs}"
    assert len({tuple(o) for o in outputs[:2] + outputs[4:]}) == 4
    story = greedy(hf_reference, PROMPTS[0], 32)
    assert len(story) == 32 and len(set(story)) >= 16, f"a long output must not repeat a few tokens: {story}"
    assert sum(a != b for a, b in zip(story, story[1:])) == 31, "consecutive tokens must differ (off-by-one shows)"


def test_short_answers_end_with_eos_before_the_limit(hf_reference):
    out = greedy(hf_reference, "Say OK.", 16)
    assert len(out) < 16 and out[-1] == hf_reference[1].convert_tokens_to_ids("<|im_end|>")


def test_sampling_stays_in_the_tokenizer_vocabulary(hf_reference):
    model, tok = hf_reference
    ids = tok(tok.apply_chat_template([{"role": "user", "content": PROMPTS[2]}], add_generation_prompt=True, tokenize=False),
              add_special_tokens=False, return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(ids.repeat(8, 1), max_new_tokens=12, do_sample=True, temperature=1.5, top_p=1.0, top_k=0)
    assert int(out.max()) < len(tok)


def test_the_build_is_deterministic(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from capture_conformance.fixtures.tiny_model import build_tiny_model

    build_tiny_model(tmp_path)
    again, cached = load_file(str(tmp_path / "model.safetensors")), load_file(str(tiny_model_dir / "model.safetensors"))
    assert again.keys() == cached.keys()
    assert all(torch.equal(again[k], cached[k]) for k in again)
    assert (tmp_path / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()


def test_the_corpus_ships_and_other_ids_pass_through():
    assert len(corpus_rows()) > 100
    assert resolve_model_path("willcb/Qwen3-0.6B") == "willcb/Qwen3-0.6B"
    assert resolve_model_path(TINY_MODEL_ID).endswith(tuple("0123456789abcdef"))
