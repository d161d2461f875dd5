"""Every bad input gets a clear 4xx naming what is wrong; the server stays healthy and loses nothing."""

from __future__ import annotations

import pytest

from conftest import chat_body, stored_run_ids

CHAT = "/v1/chat/completions"


def capture(**options) -> dict:
    return chat_body(max_tokens=2, capture=options)


BAD_CHAT = [
    # (case id, body, status, a word the error must name)
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 422, "model"),
    ("missing messages", {"model": "tiny-qwen3"}, 422, "messages"),
    ("empty messages", {"model": "tiny-qwen3", "messages": []}, 422, "messages"),
    ("messages not a list", {"model": "tiny-qwen3", "messages": "hi"}, 422, "messages"),
    ("bad role", chat_body() | {"messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
    ("content not a string", chat_body() | {"messages": [{"role": "user", "content": 5}]}, 422, "content"),
    ("unknown model", chat_body() | {"model": "no-such-model"}, 404, "no-such-model"),
    ("max_tokens zero", chat_body(max_tokens=0), 422, "max_tokens"),
    ("max_tokens negative", chat_body(max_tokens=-3), 422, "max_tokens"),
    ("max_tokens over limit", chat_body(max_tokens=10**6), 422, "max_tokens"),
    ("max_tokens a string", chat_body(max_tokens="five"), 422, "max_tokens"),
    ("n two", chat_body(n=2), 400, "n=2"),
    ("temperature negative", chat_body(temperature=-1), 422, "temperature"),
    ("top_p zero", chat_body(top_p=0), 422, "top_p"),
    ("unknown selector", capture(savepoints=["model.nope"]), 422, "model.nope"),
    ("out of range layer", capture(savepoints=["model.layers[99]"]), 422, "model.layers[99]"),
    ("code as selector", capture(savepoints=["__import__('os')"]), 422, "__import__"),
    ("dunder walk", capture(savepoints=["__class__.__init__"]), 422, "__class__"),
    ("empty segment", capture(savepoints=["lm_head..output"]), 422, "lm_head..output"),
    ("duplicate selector", capture(savepoints=["lm_head", "lm_head"]), 422, "lm_head"),
    ("duplicate name", capture(savepoints=[{"name": "x", "selector": "lm_head"}, {"name": "x", "selector": "model.norm"}]), 422, "'x'"),
    ("unknown dtype", capture(dtype="float8"), 422, "dtype"),
    ("unknown format", capture(format="npy"), 422, "format"),
    ("unknown tokens", capture(tokens="middle"), 422, "tokens"),
    ("unknown capture field", capture(savepiont=["lm_head"]), 422, "savepiont"),
    ("bad savepoint name", capture(savepoints=[{"name": "../../etc", "selector": "lm_head"}]), 422, "name"),
]


@pytest.mark.parametrize("case,body,status,names", BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_request_is_a_clear_4xx_and_the_server_stays_healthy(client, case, body, status, names):
    response = client.post(CHAT, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert names in str(detail), f"{case}: error does not name {names!r}: {detail}"
    assert "Traceback" not in response.text
    assert client.get("/health").json()["status"] == "ok"
    assert client.post(CHAT, json=chat_body(max_tokens=2, store_activations=True)).status_code == 200


def test_a_pure_nnsight_prompt_of_no_tokens_is_422_and_the_server_stays_healthy(client):
    # Found by the schemathesis fuzz: an empty raw prompt reached the model, which cannot reshape 0 positions (500).
    answer = client.post("/test_pure_nnsight", json={"prompt": ""})
    assert answer.status_code == 422, answer.text
    assert "no tokens" in answer.json()["detail"]
    assert client.post("/test_pure_nnsight", json={"prompt": "Hello"}).status_code == 200


def test_malformed_json_is_422(client):
    response = client.post(CHAT, content=b'{"model": "tiny-qwen3", "messages": [', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "json" in str(response.json()["detail"]).lower()


@pytest.mark.parametrize("path", [
    "/v1/activations/0123456789abcdef0123456789abcdef/_logits",  # well-formed, unknown run
    "/v1/activations/not-a-run/_logits",
    "/v1/activations/..%2F..%2Fetc/passwd",
    "/v1/activations/../x",
])
def test_unknown_run_or_traversal_is_404(client, path):
    response = client.get(path)
    assert response.status_code == 404, response.text


def test_unknown_file_of_a_real_run_is_404_and_the_run_survives(client):
    body = client.post(CHAT, json=chat_body(max_tokens=2, store_activations=True)).json()
    run = body["activation_run_id"]
    assert client.get(f"/v1/activations/{run}/..%2Fmanifest.json").status_code == 404
    assert client.get(f"/v1/activations/{run}/manifest.json").status_code == 404
    assert client.get(body["activations_meta"]["_logits"]["url"]).status_code == 200


def test_delete_removes_the_run_and_only_it(client):
    keep = client.post(CHAT, json=chat_body(max_tokens=2, store_activations=True)).json()
    gone = client.post(CHAT, json=chat_body(max_tokens=2, store_activations=True)).json()
    assert client.delete(f"/v1/activations/{gone['activation_run_id']}").status_code == 204
    assert client.get(gone["activations_meta"]["_logits"]["url"]).status_code == 404
    assert client.delete(f"/v1/activations/{gone['activation_run_id']}").status_code == 404
    assert client.get(keep["activations_meta"]["_logits"]["url"]).status_code == 200


@pytest.mark.parametrize("body,status", [
    ({"model_id": "/nonexistent/model/dir"}, 404),
    ({"model_id": 12}, 422),
    ({}, 422),
    ({"model_id": "tiny-qwen3", "dtype": "int8"}, 422),
])
def test_bad_model_load_keeps_the_loaded_model_serving(client, body, status):
    response = client.post("/models/load", json=body)
    assert response.status_code == status, response.text
    assert client.get("/health").json()["loaded_models"] == ["tiny-qwen3"]
    assert client.post(CHAT, json=chat_body(max_tokens=2)).status_code == 200


def test_loading_a_loaded_model_is_a_noop(client):
    response = client.post("/models/load", json={"model_id": "tiny-qwen3"})
    assert response.status_code == 200 and response.json() == {"ok": True, "model": "tiny-qwen3"}
    assert client.get("/health").json()["loaded_models"] == ["tiny-qwen3"]


@pytest.mark.parametrize("body,status", [({"max_new_tokens": 0}, 422), ({"model": "nope"}, 404), ({"prompt": 3}, 422)])
def test_bad_pure_nnsight_request(client, body, status):
    assert client.post("/test_pure_nnsight", json=body).status_code == status
    assert client.post("/test_pure_nnsight", json={}).json()["logits_shape"] == [1, 1, 151936]


def test_failed_request_leaves_no_files(client):
    store = client.app.state.store
    before = stored_run_ids(store)
    for body in (capture(savepoints=["model.nope"]), capture(dtype="x"), chat_body(n=3, store_activations=True)):
        assert client.post(CHAT, json=body).status_code in (400, 422)
    assert stored_run_ids(store) == before
    assert list((store.root / ".staging").iterdir()) == []
