"""The architecture zoo, served: every family builds, and the reference server captures its real modules.

One registry holds one loaded model per family for the whole module (one in-process app
serves them all, as a server with several models does); the plain transformers copies
that give the expected values are loaded once per family too. Selectors come from each
model's own module tree (its ``_no_split_modules`` block class, ``get_output_embeddings``),
never from a naming convention.
"""

from __future__ import annotations

import pytest
import torch

from capture_conformance.fixtures import zoo
from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID, resolve_model_path

from conftest import ServerProcess, make_client
from test_reference_values import download

FAMILIES = list(zoo.ZOO_IDS)
PROMPTS = ["Tell me a short story about a fox.", "Ava has 3 apples and buys 5 more. How many apples does Ava have now?",
           "Name a colour.", "Count to three."]


@pytest.fixture(scope="module")
def zoo_dirs():
    return {model_id: zoo.ensure_builtin(model_id) for model_id in FAMILIES}


@pytest.fixture(scope="module")
def zoo_registry(zoo_dirs):
    """Every family loaded once, by its built-in id, as the server loads any model."""
    from capture_conformance.reference_server.registry import ModelRegistry

    registry = ModelRegistry(device="cpu", max_loaded=len(FAMILIES))
    for model_id in FAMILIES:
        registry.load(model_id)
    yield registry
    registry.shutdown()


@pytest.fixture(scope="module")
def zoo_client(zoo_registry, tmp_path_factory):
    with make_client(zoo_registry, tmp_path_factory.mktemp("zoo") / "storage", model=None) as client:
        assert client.app.state.readiness.ready.wait(30), "in-process app never became ready"
        yield client


_REFERENCES: dict = {}


def reference(zoo_dirs, model_id):
    """The family's checkpoint through plain transformers, loaded once."""
    if model_id not in _REFERENCES:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(zoo_dirs[model_id])
        model.eval()
        _REFERENCES[model_id] = model, AutoTokenizer.from_pretrained(zoo_dirs[model_id])
    return _REFERENCES[model_id]


def module_path(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def block_stack(model) -> tuple[str, int]:
    """The ModuleList of the model's decoder blocks (the class ``_no_split_modules`` names) and its length."""
    block_classes = set(model._no_split_modules)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and type(module[0]).__name__ in block_classes:
            return name, len(module)
    raise AssertionError(f"no block stack in {type(model).__name__}")


def chat(client, model_id, content, max_tokens, **extra):
    body = {"model": model_id, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def first_tensor(value):
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def test_the_zoo_is_one_lookup_with_distinct_families(zoo_dirs):
    assert zoo.BUILTIN_IDS[0] == TINY_MODEL_ID and set(FAMILIES) < set(zoo.BUILTIN_IDS)
    assert all(zoo.is_builtin(i) for i in zoo.BUILTIN_IDS) and not zoo.is_builtin("gpt2") and not zoo.is_builtin(None)
    for model_id in zoo.BUILTIN_IDS:
        assert zoo.builtin_model_dir(model_id) == zoo.ensure_builtin(model_id)
        assert resolve_model_path(model_id) == str(zoo.builtin_model_dir(model_id))
    assert resolve_model_path("some/hub-id") == "some/hub-id"
    with pytest.raises(KeyError):
        zoo.builtin_model_dir("tiny-nothing")
    families = zoo.FAMILIES.values()
    assert len({f.hidden_size for f in families} | {256}) == len(FAMILIES) + 1  # tiny-qwen3 is 256 wide
    assert len({f.vocab_size for f in families}) == len(FAMILIES)
    assert len({f.architecture for f in families}) == len(FAMILIES)
    assert zoo.FAMILIES["tiny-gpt2"].vocab_size == 2048


@pytest.mark.parametrize("model_id", FAMILIES)
def test_family_is_built_as_declared(zoo_dirs, model_id):
    family = zoo.FAMILIES[model_id]
    model, tok = reference(zoo_dirs, model_id)
    assert type(model).__name__ == family.architecture
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (family.hidden_size, 3, family.vocab_size)
    assert len(tok) == family.vocab_size, "the trained vocabulary is the model's"
    assert model.get_output_embeddings().weight.shape == (family.vocab_size, family.hidden_size)
    for token in family.specials_first + family.specials_last:
        assert token in tok.all_special_tokens or tok.convert_tokens_to_ids(token) is not None
    for i, token in enumerate(family.specials_first):
        assert tok.convert_tokens_to_ids(token) == i
    for i, token in enumerate(family.specials_last):
        assert tok.convert_tokens_to_ids(token) == family.vocab_size - len(family.specials_last) + i
    text = "Héllo wörld, 1234 😀"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                       add_generation_prompt=True, tokenize=False)
    assert "Be brief." in rendered and "Hi" in rendered
    if family.architecture == "GPTNeoXJapaneseForCausalLM":
        assert module_path(model, model.get_output_embeddings()) == "embed_out"


@pytest.mark.parametrize("model_id", FAMILIES)
def test_logits_and_a_middle_block_equal_plain_transformers(zoo_client, zoo_dirs, model_id):
    model, tok = reference(zoo_dirs, model_id)
    stack, n_blocks = block_stack(model)
    middle = f"{stack}.{n_blocks // 2}"
    content, n = PROMPTS[0], 8
    body = chat(zoo_client, model_id, content, n, capture={
        "savepoints": [{"name": "logits", "selector": "logits"}, {"name": "mid", "selector": middle}],
        "format": "safetensors"})
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False), add_special_tokens=False)["input_ids"]
    assert body["prompt_token_ids"] == prompt
    new = body["completion_token_ids"]
    assert 1 <= len(new) <= n and body["usage"]["completion_tokens"] == len(new)
    logits = download(zoo_client, body["activations_meta"]["logits"])
    mid = download(zoo_client, body["activations_meta"]["mid"])
    assert logits.shape == (1, len(new), model.config.vocab_size)
    assert mid.shape == (1, len(new), model.config.hidden_size)
    assert body["activations_meta"]["logits"]["selector"] == "logits"

    # One plain forward over prompt + completion: step i's value is that of position P-1+i.
    seen = {}

    def keep(module, args, output):  # returns None: the output goes on unchanged
        seen["mid"] = first_tensor(output)

    hook = model.get_submodule(middle).register_forward_hook(keep)
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompt + new[:-1]]))
    finally:
        hook.remove()
    steps = slice(len(prompt) - 1, len(prompt) - 1 + len(new))
    torch.testing.assert_close(logits, out.logits[:, steps], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mid, seen["mid"][:, steps], rtol=1e-4, atol=1e-4)
    assert logits[0].argmax(-1).tolist() == new, "greedy ids are the argmax of the captured logits"
    # And the ids are transformers' own greedy generation.
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    assert new == ref


def listed_under(client, model_id, prefix) -> list[str]:
    entry = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == model_id)
    return [s for s in entry["capture"]["savepoints"] if s == prefix or s.startswith(prefix + ".")]


@pytest.mark.parametrize("model_id", FAMILIES)
def test_every_savepoint_of_a_block_equals_plain_transformers(zoo_client, zoo_dirs, model_id):
    """All the block's listed savepoints (attention, MLP, norms, inputs; OPT's flattened fc1/fc2 too)."""
    model, _ = reference(zoo_dirs, model_id)
    stack, n_blocks = block_stack(model)
    selectors = listed_under(zoo_client, model_id, f"{stack}.{n_blocks // 2}")
    assert len(selectors) >= 4, selectors
    content, n = PROMPTS[1], 5
    body = chat(zoo_client, model_id, content, n, capture={"savepoints": selectors, "format": "safetensors"})
    prompt, new = body["prompt_token_ids"], body["completion_token_ids"]
    seen, hooks = {}, []
    for selector in selectors:
        path, io = (selector.removesuffix(".input"), "input") if selector.endswith(".input") else (selector, "output")
        module = model.get_submodule(path)

        def keep(mod, args, output=None, selector=selector, io=io):  # the first call's value, as the server keeps
            if selector not in seen:
                seen[selector] = first_tensor(args[0] if io == "input" else output)

        hooks.append(module.register_forward_pre_hook(keep) if io == "input" else module.register_forward_hook(keep))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([prompt + new[:-1]]))
    finally:
        for hook in hooks:
            hook.remove()
    steps = slice(len(prompt) - 1, len(prompt) - 1 + len(new))
    for selector in selectors:
        want = seen[selector]
        want = want[:, steps] if want.shape[0] == 1 else want[steps].unsqueeze(0)  # [1, T, ...] or flattened [T, ...]
        got = download(zoo_client, body["activations_meta"][selector])
        assert got.shape == want.shape, selector
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=selector)


@pytest.mark.parametrize("model_id", FAMILIES)
def test_models_lists_the_real_module_paths(zoo_client, zoo_dirs, model_id):
    model, _ = reference(zoo_dirs, model_id)
    entry = next(m for m in zoo_client.get("/v1/models").json()["data"] if m["id"] == model_id)
    capture = entry["capture"]
    modules = dict(model.named_modules())
    listed = [s.removesuffix(".input") for s in capture["savepoints"]]
    assert listed and all(path in modules for path in listed), [p for p in listed if p not in modules]
    stack, n_blocks = block_stack(model)
    head = module_path(model, model.get_output_embeddings())
    assert head in capture["savepoints"] and f"{head}.input" in capture["savepoints"]
    assert all(f"{stack}.{i}" in capture["savepoints"] for i in range(n_blocks))
    assert (capture["vocab_size"], capture["hidden_size"], capture["num_layers"]) == (
        model.config.vocab_size, model.config.hidden_size, n_blocks)


@pytest.mark.parametrize("model_id", FAMILIES)
def test_greedy_chat_is_varied_and_short_answers_end(zoo_client, model_id):
    outputs = [chat(zoo_client, model_id, p, 12)["choices"][0]["message"]["content"] for p in PROMPTS]
    assert len(set(outputs)) >= 3, f"outputs hardly depend on the prompt: {outputs}"
    story = chat(zoo_client, model_id, PROMPTS[0], 12, store_activations=True)
    ids = story["completion_token_ids"]
    assert len(set(ids)) > 1, f"one repeated token: {ids}"
    assert story["activations_meta"]["_logits"]["shape"] == [1, len(ids), zoo.FAMILIES[model_id].vocab_size]
    short = chat(zoo_client, model_id, "Say OK.", 16)
    assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 16


@pytest.mark.parametrize("model_id", FAMILIES)
def test_batched_requests_equal_their_solo_runs(zoo_registry, zoo_dirs, model_id):
    """Left padding in a batch must not move positions (GPT-2 and OPT learn absolute ones)."""
    from capture_conformance.reference_server import chat as chat_rules
    from capture_conformance.reference_server.selectors import parse_selector
    from capture_conformance.reference_server.types import GenerationParams, GenerationRequest, PlannedSavepoint

    model = zoo_registry.get(model_id).model
    stack, _ = block_stack(reference(zoo_dirs, model_id)[0])
    selectors = ["logits", *(s for s in model.savepoint_catalogue() if s.startswith(f"{stack}.0."))][:64]

    def request(content, max_tokens, positions):
        prompt = chat_rules.render_prompt(model.tokenizer, [{"role": "user", "content": content}])
        plan = [PlannedSavepoint(s, parse_selector(s, model.aliases), model.site(parse_selector(s, model.aliases)))
                for s in selectors]
        return GenerationRequest(prompt, GenerationParams(max_new_tokens=max_tokens), plan, positions=positions)

    for positions in ("generated", "sequence"):
        requests = [request(PROMPTS[1], 6, positions), request("Say OK.", 6, positions)]
        assert len(requests[0].prompt_ids) != len(requests[1].prompt_ids)
        solo = [model.generate_batch([r])[0] for r in requests]
        together = model.generate_batch(requests)
        for alone, batched in zip(solo, together):
            assert batched.token_ids == alone.token_ids
            assert batched.tensors.keys() == alone.tensors.keys() == set(selectors)
            for name in alone.tensors:
                torch.testing.assert_close(batched.tensors[name], alone.tensors[name], rtol=1e-3, atol=1e-3,
                                           msg=f"{positions} {name}")


def test_a_family_build_is_deterministic(tmp_path, zoo_dirs):
    """What the cache digest promises: the same recipe gives the same files (the cheapest family)."""
    from safetensors.torch import load_file

    family = min(zoo.FAMILIES.values(), key=lambda f: f.hidden_size)
    zoo.build_family(family, tmp_path)
    cached = zoo_dirs[family.model_id]
    again, before = load_file(str(tmp_path / "model.safetensors")), load_file(str(cached / "model.safetensors"))
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in again)
    assert (tmp_path / "tokenizer.json").read_text() == (cached / "tokenizer.json").read_text()


def test_capture_server_serves_a_zoo_id_by_name(tmp_path, zoo_dirs):
    import requests

    with ServerProcess(tmp_path, "--model", "tiny-gpt2", "--device", "cpu") as server:
        models = requests.get(f"{server.url}/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models] == ["tiny-gpt2"]
        assert "transformer.h.1" in models[0]["capture"]["savepoints"]
        body = requests.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-gpt2", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
            "store_activations": True}).json()
        n = len(body["completion_token_ids"])
        assert body["activations_meta"]["_logits"]["shape"] == [1, n, 2048]
