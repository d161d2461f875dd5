"""Savepoint discovery: every family's roles found by structure, never by a name this project assumes.

The expected paths below are the families' own module names as transformers
builds them (read off the model classes' source, not off ``layout.py``); the
models are built on the ``meta`` device from tiny configs, so no weight is made.
"""

from __future__ import annotations

import pytest

from capture_conformance.harness.protocol.layout import (
    HEAD_ALIAS,
    discover_layout,
    layout_from_module,
    layout_from_selectors,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# family -> (config factory, expected roles)
FAMILIES = {
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, n_inner=80, vocab_size=97,
                                             n_positions=64),
             dict(blocks="transformer.h", head="lm_head", embeddings="transformer.wte", final_norm="transformer.ln_f",
                  block_attention="attn", block_mlp="mlp", block_down_proj="mlp.c_proj", block_norm="ln_1",
                  hidden_size=32, vocab_size=97, intermediate_size=80)),
    "neox": (lambda: transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                intermediate_size=72, vocab_size=89, max_position_embeddings=64),
             dict(blocks="gpt_neox.layers", head="lm_head", embeddings="gpt_neox.embed_in",
                  final_norm="gpt_neox.final_layer_norm", block_attention="attention", block_mlp="mlp",
                  block_down_proj="mlp.dense_4h_to_h", block_norm="input_layernorm",
                  hidden_size=32, vocab_size=89, intermediate_size=72)),
    "opt": (lambda: transformers.OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, ffn_dim=64,
                                           vocab_size=83, max_position_embeddings=64, word_embed_proj_dim=32),
            dict(blocks="model.decoder.layers", head="lm_head", embeddings="model.decoder.embed_tokens",
                 final_norm="model.decoder.final_layer_norm", block_attention="self_attn", block_mlp=None,
                 block_down_proj="fc2", block_norm="self_attn_layer_norm",
                 hidden_size=32, vocab_size=83, intermediate_size=64)),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                               num_key_value_heads=2, intermediate_size=48, vocab_size=79),
              dict(blocks="model.layers", head="lm_head", embeddings="model.embed_tokens", final_norm="model.norm",
                   block_attention="self_attn", block_mlp="mlp", block_down_proj="mlp.down_proj",
                   block_norm="input_layernorm", hidden_size=32, vocab_size=79, intermediate_size=48)),
    "phi3": (lambda: transformers.Phi3Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=40, vocab_size=71,
                                             pad_token_id=0),
             dict(blocks="model.layers", head="lm_head", embeddings="model.embed_tokens", final_norm="model.norm",
                  block_attention="self_attn", block_mlp="mlp", block_down_proj="mlp.down_proj",
                  block_norm="input_layernorm", hidden_size=32, vocab_size=71, intermediate_size=40)),
}


def _meta_model(config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_familys_roles_are_found_in_its_module_tree(family):
    make_config, expected = FAMILIES[family]
    layout = layout_from_module(_meta_model(make_config()))
    assert layout.independent and layout.num_blocks == 3
    found = {key: getattr(layout, key) for key in expected}
    assert found == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_discovered_selector_names_a_real_module(family):
    model = _meta_model(FAMILIES[family][0]())
    layout = layout_from_module(model)
    names = {name for name, _ in model.named_modules()}
    paths = [layout.head, layout.embeddings, layout.final_norm, layout.block_dotted(layout.last)]
    paths += [layout.block_dotted(1, sub) for sub in (layout.block_attention, layout.block_mlp,
                                                      layout.block_down_proj, layout.block_norm) if sub]
    assert [p for p in paths if p not in names] == []


def test_selectors_use_the_protocols_spellings():
    layout = layout_from_module(_meta_model(FAMILIES["gpt2"][0]()))
    assert layout.block(1) == "transformer.h[1]"
    assert layout.block(-1, "mlp.c_proj", io="input") == "transformer.h[2].mlp.c_proj.input"
    assert layout.block_dotted(0, "mlp") == "transformer.h.0.mlp"
    assert layout.block_of("transformer.h.2.mlp") == (2, ".mlp")
    assert layout.block_of("transformer.ln_f") is None
    assert layout.canonical("logits") == "lm_head" and layout.is_head("logits") and layout.is_head("lm_head")
    assert not layout.is_head("transformer.h.0")


def test_the_servers_list_gives_a_layout_marked_not_independent():
    listed = ["transformer.wte", "transformer.wpe"] + [
        f"transformer.h[{i}]{sub}" for i in range(4)
        for sub in ("", ".ln_1", ".attn", ".attn.c_attn", ".mlp", ".mlp.c_fc", ".mlp.c_proj")
    ] + ["transformer.ln_f", "lm_head", "logits"]
    layout = layout_from_selectors(listed)
    assert (layout.blocks, layout.num_blocks, layout.independent) == ("transformer.h", 4, False)
    assert (layout.block_attention, layout.block_mlp, layout.block_down_proj, layout.block_norm) == (
        "attn", "mlp", "mlp.c_proj", "ln_1")
    assert (layout.embeddings, layout.final_norm, layout.head) == ("transformer.wte", "transformer.ln_f", HEAD_ALIAS)


def test_a_list_with_a_gap_counts_blocks_only_up_to_the_gap():
    layout = layout_from_selectors(["model.layers.0", "model.layers.1", "model.layers.3", "model.norm"])
    assert layout.num_blocks == 2


def test_a_list_without_a_block_stack_is_a_lookup_error_naming_what_it_saw():
    with pytest.raises(LookupError, match="no indexed block stack"):
        layout_from_selectors(["lm_head", "embed"])


def test_discovery_prefers_the_module_tree_and_falls_back_to_the_server_naming_why(tmp_path):
    FAMILIES["opt"][0]().save_pretrained(tmp_path)
    asked = []
    tree = discover_layout(str(tmp_path), lambda: asked.append(1) or ["x.blocks.0"])
    assert tree.blocks == "model.decoder.layers" and tree.independent and asked == []
    fallback = discover_layout(None, lambda: ["x.blocks.0", "x.blocks.1"])
    assert fallback.blocks == "x.blocks" and not fallback.independent
    assert any("no local copy" in note for note in fallback.notes)
    with pytest.raises(LookupError, match="lists no capture.savepoints"):
        discover_layout(None, lambda: [])


def test_snapshots_record_roles_not_module_names():
    layout = layout_from_module(_meta_model(FAMILIES["neox"][0]()))
    assert layout.role("gpt_neox.layers[2]") == "{blocks}[2]"
    assert layout.role("gpt_neox.layers.0.mlp.input") == "{blocks}.0.mlp.input"
    # A server may echo the alias as asked or the module it resolved it to: one role either way.
    assert layout.role("lm_head.input") == "{head}.input" and layout.role("logits") == "{head}"
    # A path outside the model's roles is kept as it is, so a server echoing another module shows as a change.
    assert layout.role("gpt_neox.layers_extra.0") == "gpt_neox.layers_extra.0"
    assert layout.role("model.layers[0]") == "model.layers[0]"
