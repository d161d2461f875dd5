"""/models/load canonical ids, its limit and its errors; batches bounded by their padded size (issue 15)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from conftest import chat_body
from capture_conformance.reference_server.errors import Conflict
from capture_conformance.reference_server.types import GenerationParams, GenerationRequest
from capture_conformance.reference_server.registry import ModelRegistry, ModelWorker


class FakeModel:
    def __init__(self, model_id="fake"):
        self.model_id = model_id
        self.info = SimpleNamespace(dtype="float32")
        self.batches: list[list[int]] = []  # prompt lengths per generate

    def generate_batch(self, requests):
        self.batches.append([len(r.prompt_ids) for r in requests])
        return [SimpleNamespace(token_ids=[1]) for _ in requests]


def test_every_spelling_of_a_directory_is_one_model(tmp_path):
    loads = []
    registry = ModelRegistry(loader=lambda model_id, device, dtype: loads.append(model_id) or FakeModel(model_id))
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (tmp_path / "link").symlink_to(model_dir)
    d = str(model_dir)
    try:
        assert registry.load(d) is True
        for spelling in (d + "/", d + "/.", d + "//", str(tmp_path / "link"), str(tmp_path / "m" / ".." / "m")):
            assert registry.load(spelling) is False, spelling
            assert registry.loaded_id(spelling) == d
            assert registry.get(spelling) is registry.get(d)
        assert loads == [d] and registry.ids() == [d]
    finally:
        registry.shutdown()


def test_loaded_models_are_limited(tmp_path):
    registry = ModelRegistry(loader=lambda model_id, device, dtype: FakeModel(model_id), max_loaded=2)
    dirs = []
    for name in "abc":
        (tmp_path / name).mkdir()
        dirs.append(str(tmp_path / name))
    try:
        registry.load(dirs[0])
        registry.load(dirs[1])
        with pytest.raises(Conflict, match="--max-loaded-models"):
            registry.load(dirs[2])
        assert registry.load(dirs[0] + "/") is False  # a loaded model is not counted twice
        assert registry.ids() == dirs[:2]
    finally:
        registry.shutdown()


def test_load_errors_do_not_tell_which_host_files_exist(client, tmp_path):
    not_a_model = tmp_path / "plain"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{not json")
    (tmp_path / "file.txt").write_text("x")
    answers = {}
    for path in (tmp_path / "missing", not_a_model, tmp_path / "file.txt", tmp_path / "plain" / "config.json"):
        response = client.post("/models/load", json={"model_id": str(path)})
        answers[str(path)] = (response.status_code, response.json()["detail"].replace(repr(str(path)), "ID"))
    assert len(set(answers.values())) == 1, answers
    status, detail = next(iter(answers.values()))
    assert status == 404 and "config" not in detail and "No such" not in detail and "directory" not in detail
    assert client.get("/health").json()["loaded_models"] == ["tiny-qwen3"]


def test_the_tiny_model_by_any_path_spelling_is_the_loaded_model(client, tiny_model_dir):
    d = str(tiny_model_dir)
    for spelling in (d, d + "/", d + "/.", d + "//"):
        response = client.post("/models/load", json={"model_id": spelling})
        assert response.status_code == 200 and response.json()["model"] == "tiny-qwen3", response.text
    assert client.get("/health").json()["loaded_models"] == ["tiny-qwen3"]
    served = client.post("/v1/chat/completions", json=chat_body(max_tokens=2) | {"model": d + "//"})
    assert served.status_code == 200, served.text


def gen_request(prompt_len: int, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(list(range(prompt_len)), GenerationParams(max_new_tokens=max_tokens), [])


def test_a_batch_is_bounded_by_its_padded_size_not_only_its_rows():
    model = FakeModel()
    worker = ModelWorker(model, max_batch=8, max_batch_tokens=1000)
    release = threading.Event()
    # One long prompt (900 + 10) among short ones (20 + 10): batched together they would
    # hold 4 x 910 padded tokens; bounded, the long one runs alone.
    requests = [gen_request(20, 10), gen_request(900, 10), gen_request(20, 10), gen_request(20, 10), gen_request(2000, 5)]

    async def scenario():
        blocker = asyncio.ensure_future(worker.run(release.wait, 30))
        await asyncio.sleep(0.05)
        pending = [asyncio.ensure_future(worker.generate(r)) for r in requests]
        await asyncio.sleep(0.05)
        release.set()
        await blocker
        return await asyncio.gather(*pending)

    try:
        assert len(asyncio.run(scenario())) == len(requests)
    finally:
        worker.shutdown()
    assert sorted(map(sorted, model.batches)) == [[20, 20, 20], [900], [2000]], model.batches
    for batch in model.batches:  # a request over the budget alone still runs, alone
        assert len(batch) == 1 or len(batch) * (max(batch) + 10) <= 1000
