"""The load policy of POST /models/load, POST /models/unload and the loopback Host check (issue 20, item 9)."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from conftest import chat_body
from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID
from capture_conformance.reference_server.app import create_app
from capture_conformance.reference_server.errors import Forbidden
from capture_conformance.reference_server.guards import LoopbackHostGuard
from capture_conformance.reference_server.registry import LoadPolicy, ModelRegistry
from capture_conformance.reference_server.settings import Settings


class FakeModel:
    def __init__(self, model_id):
        self.model_id = model_id
        self.info = SimpleNamespace(dtype="float32")

    def generate_batch(self, requests):
        return [SimpleNamespace(token_ids=[1]) for _ in requests]


@pytest.fixture
def policy_app(registry, tmp_path):
    """An app with its own registry and the server's default policy; the startup model is the session's tiny model."""
    tiny = registry.get(TINY_MODEL_ID).model
    loads: list[str] = []

    def loader(model_id, device, dtype):
        loads.append(model_id)
        return tiny if model_id == TINY_MODEL_ID else FakeModel(model_id)

    def make(*allowed: str, allow_any: bool = False, max_loaded: int = 4):
        own = ModelRegistry(loader=loader, max_loaded=max_loaded,
                            policy=LoadPolicy(allowed, allow_any=allow_any, startup=TINY_MODEL_ID))
        app = create_app(Settings(storage_dir=tmp_path / "storage"), registry=own)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        assert app.state.readiness.ready.wait(30)
        made.append((client, own))
        return client

    made: list = []
    make.loads = loads
    yield make
    for client, own in made:
        client.__exit__(None, None, None)
        own.shutdown()


def model_dir(root, name):
    path = root / name
    path.mkdir(parents=True)
    return str(path)


def test_by_default_only_the_startup_and_built_in_models_load(policy_app, tmp_path):
    client = policy_app()
    somewhere = model_dir(tmp_path, "a-model")
    for model_id in (somewhere, "/etc/passwd", str(tmp_path / "missing"), "some-org/some-model", "no such model"):
        answer = client.post("/models/load", json={"model_id": model_id})
        assert answer.status_code == 403, (model_id, answer.text)
        body = answer.json()
        assert "--allow-load" in body["detail"] and body["error"]["type"] == "permission_error", body
        assert body["error"]["message"] == body["detail"]
    # A refused path answers alike whether it exists or not: nothing about the host's files.
    texts = {client.post("/models/load", json={"model_id": p}).json()["detail"].replace(repr(p), "ID")
             for p in (somewhere, str(tmp_path / "missing"))}
    assert len(texts) == 1, texts
    assert policy_app.loads == [TINY_MODEL_ID], "a refused id reached the loader"
    assert client.post("/models/load", json={"model_id": TINY_MODEL_ID}).status_code == 200  # the startup model
    assert client.get("/health").json()["loaded_models"] == [TINY_MODEL_ID]


def test_built_in_tiny_ids_are_allowed_without_listing():
    policy = LoadPolicy()
    for model_id in ("tiny-qwen3", "tiny-gpt2", "tiny-llama"):
        policy.check(model_id)  # built locally from code: no operator file, no network
    with pytest.raises(Forbidden):
        policy.check("tiny-qwen3-but-not")


def test_listed_ids_and_directories_load_and_nothing_escapes_them(policy_app, tmp_path):
    allowed = tmp_path / "models"
    inside = model_dir(allowed, "m1")
    outside = model_dir(tmp_path, "outside")
    os.symlink(outside, allowed / "link-out")
    client = policy_app(str(allowed), "org/listed")
    assert client.post("/models/load", json={"model_id": inside}).status_code == 200
    assert client.post("/models/load", json={"model_id": "org/listed"}).status_code == 200
    for escape in (str(allowed / ".." / "outside"), str(allowed / "link-out"), outside, str(allowed) + "-twin",
                   "org/other"):
        if escape.endswith("-twin"):
            os.makedirs(escape, exist_ok=True)
        answer = client.post("/models/load", json={"model_id": escape})
        assert answer.status_code == 403, (escape, answer.text)
    assert sorted(client.get("/health").json()["loaded_models"]) == sorted([TINY_MODEL_ID, inside, "org/listed"])


def test_allow_any_load_opens_everything(policy_app, tmp_path):
    client = policy_app(allow_any=True)
    anywhere = model_dir(tmp_path, "anywhere")
    assert client.post("/models/load", json={"model_id": anywhere}).status_code == 200
    assert "ANY" in client.app.state.registry.policy.describe()


def test_unload_frees_a_slot_and_the_startup_model_stays(policy_app, tmp_path):
    root = tmp_path / "models"
    a, b = model_dir(root, "a"), model_dir(root, "b")
    client = policy_app(str(root), max_loaded=2)
    assert client.post("/models/load", json={"model_id": a}).status_code == 200
    full = client.post("/models/load", json={"model_id": b})
    assert full.status_code == 409 and "--max-loaded-models" in full.json()["detail"], full.text
    gone = client.post("/models/unload", json={"model_id": a + "/"})  # any spelling of it
    assert gone.status_code == 200 and gone.json() == {"ok": True, "model": a}, gone.text
    assert client.get("/health").json()["loaded_models"] == [TINY_MODEL_ID]
    assert client.post(CHAT, json=chat_body(max_tokens=1, model=a)).status_code == 404
    assert client.post("/models/load", json={"model_id": b}).status_code == 200  # the slot is free again
    startup = client.post("/models/unload", json={"model_id": TINY_MODEL_ID})
    assert startup.status_code == 409 and "startup model" in startup.json()["detail"], startup.text
    unknown = client.post("/models/unload", json={"model_id": a})
    assert unknown.status_code == 404 and "not loaded" in unknown.json()["detail"], unknown.text
    assert client.post("/models/unload", json={}).status_code == 422
    assert client.post(CHAT, json=chat_body(max_tokens=1)).status_code == 200


def test_an_unloaded_model_serves_its_queued_requests_first():
    import threading

    from capture_conformance.reference_server.registry import ModelWorker
    from capture_conformance.reference_server.types import GenerationParams, GenerationRequest

    release, served = threading.Event(), []

    class Slow(FakeModel):
        def generate_batch(self, requests):
            release.wait(10)
            served.append(len(requests))
            return super().generate_batch(requests)

    worker = ModelWorker(Slow("slow"), max_batch=1)

    async def scenario():
        jobs = [asyncio.ensure_future(worker.generate(GenerationRequest([1], GenerationParams(1), [])))
                for _ in range(3)]
        await asyncio.sleep(0.05)
        worker.drain()
        release.set()
        return await asyncio.gather(*jobs)

    results = asyncio.run(scenario())
    assert [r.token_ids for r in results] == [[1]] * 3 and served == [1, 1, 1]
    worker._thread.join(5)
    assert not worker._thread.is_alive(), "a drained worker's thread should end"


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("host,status", [
    ("localhost:8006", 200), ("127.0.0.1", 200), ("[::1]:9", 200), ("LOCALHOST.:80", 200),
    ("evil.example", 421), ("evil.example:8006", 421), ("127.0.0.1.evil.example", 421), ("localhost.evil:1", 421),
])
def test_the_loopback_host_check(host, status):
    inner = FastAPI()
    inner.get("/v1/models")(lambda: {"ok": True})
    client = TestClient(LoopbackHostGuard(inner))
    answer = client.get("/v1/models", headers={"host": host})
    assert answer.status_code == status, (host, answer.text)
    if status == 421:
        assert "DNS rebinding" in answer.json()["detail"] and host in answer.json()["detail"]
