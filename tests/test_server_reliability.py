"""Auth, limits, storage faults and disconnects on the reference server (issue 5, server side)."""

from __future__ import annotations

import socket
import time

import pytest
import requests
import torch

from conftest import ServerProcess, chat_body, make_client, stored_run_ids

CHAT = "/v1/chat/completions"


@pytest.fixture
def guarded(registry, tmp_path):
    with make_client(registry, tmp_path / "s", api_key="s3cret", max_body_bytes=4096, max_savepoints=3,
                     max_capture_mb=1.0) as c:
        assert c.app.state.readiness.ready.wait(30)
        yield c


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}])
@pytest.mark.parametrize("method,path", [("post", CHAT), ("get", "/v1/models"), ("post", "/models/load"),
                                         ("post", "/test_pure_nnsight"), ("get", "/openapi.json"),
                                         ("get", "/v1/activations/0123456789abcdef0123456789abcdef/_logits")])
def test_every_endpoint_but_health_needs_the_key(guarded, headers, method, path):
    response = getattr(guarded, method)(path, headers=headers, **({"json": chat_body()} if method == "post" else {}))
    assert response.status_code == 401 and response.json()["detail"] == "unauthorized"
    assert response.json()["error"]["type"] == "authentication_error"


def test_the_right_key_opens_and_health_needs_none(guarded):
    assert guarded.get("/health").status_code == 200
    # HEAD is what load balancers and `curl -I` probe with (issue 20: it was 405): the same status, no body.
    head = guarded.head("/health")
    assert head.status_code == 200 and head.content == b"", (head.status_code, head.content[:80])
    ok = guarded.post(CHAT, json=chat_body(max_tokens=2), headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200, ok.text


def key(**kw):
    return {"headers": {"Authorization": "Bearer s3cret"}, **kw}


def test_body_size_limit_is_413_naming_it(guarded):
    body = chat_body(content="x" * 5000)
    response = guarded.post(CHAT, **key(json=body))
    assert response.status_code == 413 and "--max-body-bytes" in response.json()["detail"]

    def chunked():  # no Content-Length: the limit must hold while the body streams in
        yield b'{"model": "tiny-qwen3", "messages": [{"role": "user", "content": "'
        yield b"x" * 5000
        yield b'"}]}'

    response = guarded.post(CHAT, content=chunked(), **key(headers={"Authorization": "Bearer s3cret", "content-type": "application/json"}))
    assert response.status_code == 413


def test_savepoint_count_limit_is_422_naming_it(guarded):
    body = chat_body(max_tokens=2, capture={"savepoints": ["model.layers[0]", "model.layers[1]", "model.norm", "lm_head"]})
    response = guarded.post(CHAT, **key(json=body))
    assert response.status_code == 422 and "--max-savepoints" in response.json()["detail"]


def test_capture_size_is_refused_before_generating(guarded):
    # 2 tokens x 151936 x 4 bytes = 1.16 MiB > 1 MiB; bfloat16 halves it under the limit.
    response = guarded.post(CHAT, **key(json=chat_body(max_tokens=2, store_activations=True)))
    assert response.status_code == 422 and "--max-capture-mb" in response.json()["detail"]
    assert stored_run_ids(guarded.app.state.store) == []
    ok = guarded.post(CHAT, **key(json=chat_body(max_tokens=2, capture={"dtype": "bfloat16"})))
    assert ok.status_code == 200, ok.text


def test_disk_full_is_507_leaves_nothing_and_the_server_keeps_serving(client, monkeypatch):
    store = client.app.state.store
    real_save = torch.save

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    response = client.post(CHAT, json=chat_body(max_tokens=2, store_activations=True))
    assert response.status_code == 507 and "No space left" in response.json()["detail"]
    assert stored_run_ids(store) == [] and list((store.root / ".staging").iterdir()) == []
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.undo()
    assert client.post(CHAT, json=chat_body(max_tokens=2, store_activations=True)).status_code == 200


def test_unwritable_storage_is_507(client):
    store = client.app.state.store
    staging = store.root / ".staging"
    staging.rmdir()
    staging.write_text("not a directory")  # root ignores permissions, so break the path instead
    try:
        response = client.post(CHAT, json=chat_body(max_tokens=2, store_activations=True))
        assert response.status_code == 507, response.text
        assert client.post(CHAT, json=chat_body(max_tokens=2)).status_code == 200
    finally:
        staging.unlink()
        staging.mkdir()


def test_retention_over_http(registry, tmp_path):
    run_mb = 3 * 151936 * 4 / 2**20  # one 3-token fp32 logits capture
    with make_client(registry, tmp_path / "r", max_storage_mb=2.5 * run_mb) as c:
        assert c.app.state.readiness.ready.wait(30)
        bodies = [c.post(CHAT, json=chat_body(max_tokens=3, store_activations=True)).json() for _ in range(4)]
        assert [c.get(b["activations_meta"]["_logits"]["url"]).status_code for b in bodies] == [404, 404, 200, 200]


def test_a_client_that_disconnects_mid_generation_leaves_the_server_usable(tmp_path, tiny_model_dir):
    server = ServerProcess(tmp_path)
    try:
        server.wait_ready()
        body = requests.models.complexjson.dumps(chat_body(max_tokens=300, store_activations=True)).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.2)  # the generation has started; hanging up now is the point of the test
        started = time.monotonic()
        response = requests.post(server.url + CHAT, json=chat_body(max_tokens=3, store_activations=True), timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["activations_meta"]["_logits"]["shape"][1] == 3
        assert time.monotonic() - started < 60
        assert requests.get(server.url + "/health", timeout=5).json()["status"] == "ok"
    finally:
        server.stop()


def test_binding_all_interfaces_without_a_key_warns(tmp_path, tiny_model_dir):
    server = ServerProcess(tmp_path, "--host", "0.0.0.0")
    try:
        server.wait_ready()
    finally:
        server.stop()
    assert "without --api-key" in server.log_path.read_text()
