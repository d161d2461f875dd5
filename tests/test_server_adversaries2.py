"""The reference server under adversaries, round two (issue 20): stop strings, storage, the small items."""

from __future__ import annotations

import random
import string
import threading
import time

import pytest

from conftest import chat_body
from capture_conformance.reference_server.input_rules import MAX_STOP_CHARS, MAX_STOP_STRINGS

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("stop,named", [
    (["a"] * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS}"),
    (["x" * (MAX_STOP_CHARS + 1)], f"limit of {MAX_STOP_CHARS} characters"),
    ("y" * 240_000, f"limit of {MAX_STOP_CHARS} characters"),
    (["ok", ""], "one empty"),
])
def test_stop_strings_over_the_cap_are_422_naming_it(client, stop, named):
    answer = client.post(CHAT, json=chat_body(max_tokens=3, stop=stop))
    assert answer.status_code == 422 and named in answer.json()["detail"], answer.text[:300]


def test_a_one_token_request_is_answered_within_a_second_beside_the_largest_stop_strings(client):
    rng = random.Random(20)
    # The worst case for transformers' tables: long runs of one character (every token overlaps),
    # each string new (its tables are cached per distinct stop list).
    stops = ["a" * (MAX_STOP_CHARS - 8) + "".join(rng.choice(string.ascii_letters) for _ in range(8))
             for _ in range(MAX_STOP_STRINGS)]
    big: dict = {}
    started = threading.Event()

    def run_big():
        started.set()
        big["answer"] = client.post(CHAT, json=chat_body(max_tokens=3, stop=stops))

    thread = threading.Thread(target=run_big)
    thread.start()
    started.wait(5)
    time.sleep(0.05)  # the stop request is on the worker first
    t0 = time.perf_counter()
    small = client.post(CHAT, json=chat_body(max_tokens=1))
    elapsed = time.perf_counter() - t0
    thread.join(60)
    assert small.status_code == 200, small.text
    assert big["answer"].status_code == 200, big["answer"].text
    assert elapsed < 1.0, f"a 1-token request took {elapsed:.2f} s beside 4 stop strings of {MAX_STOP_CHARS} chars"


# -- storage: any content in the storage directory, accounting that follows the disk ------------

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import uuid  # noqa: E402
from collections import namedtuple  # noqa: E402

import torch  # noqa: E402

from conftest import make_client  # noqa: E402
from capture_conformance.reference_server.errors import StorageFull  # noqa: E402
from capture_conformance.reference_server.storage import RunStore  # noqa: E402


def plant_run(root, manifest_text: str | None = None, payload: int = 8) -> str:
    run_id = uuid.uuid4().hex
    run = root / run_id
    run.mkdir(parents=True)
    (run / "sp0.pt").write_bytes(b"x" * payload)
    text = manifest_text if manifest_text is not None else json.dumps(
        {"run_id": run_id, "format": "pt", "files": {"a": {"file": "sp0.pt", "shape": [1], "dtype": "x", "numel": 1}}})
    (run / "manifest.json").write_text(text)
    return run_id


NESTED = "[" * 5000 + "]" * 5000


def test_a_deeply_nested_manifest_is_skipped_at_start_and_404_after(registry, tmp_path):
    root = tmp_path / "storage"
    before = plant_run(root, NESTED)
    good = plant_run(root)
    with make_client(registry, root) as client:
        assert client.app.state.readiness.ready.wait(30)
        assert before not in client.app.state.store._sizes and good in client.app.state.store._sizes
        after = plant_run(root, NESTED)
        for run_id in (before, after):
            answer = client.get(f"/v1/activations/{run_id}/a")
            assert answer.status_code == 404 and "damaged" in answer.json()["detail"], answer.text
        assert client.get(f"/v1/activations/{good}/a").status_code == 200


def test_a_fifo_as_a_manifest_does_not_hang_start_up(tmp_path):
    run_id = uuid.uuid4().hex
    (tmp_path / run_id).mkdir()
    os.mkfifo(tmp_path / run_id / "manifest.json")
    made: dict = {}
    thread = threading.Thread(target=lambda: made.setdefault("store", RunStore(tmp_path)), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "RunStore start-up hung on a FIFO manifest"
    assert run_id not in made["store"]._sizes


def test_a_stray_staging_file_does_not_block_captures(tmp_path):
    (tmp_path / ".staging").write_text("not a directory")
    store = RunStore(tmp_path)
    run_id, _ = store.write_run({"a": torch.ones(3)}, "pt")
    assert (tmp_path / run_id / "manifest.json").is_file()


def test_refuse_policy_follows_runs_deleted_outside(tmp_path):
    store = RunStore(tmp_path, max_bytes=4096, policy="refuse")
    first, _ = store.write_run({"a": torch.ones(300)}, "pt")  # ~2.4 KiB on disk
    with pytest.raises(StorageFull):
        store.write_run({"a": torch.ones(300)}, "pt")
    shutil.rmtree(tmp_path / first)  # an outside clean-up
    second, _ = store.write_run({"a": torch.ones(300)}, "pt")
    assert (tmp_path / second).is_dir() and store.used_bytes() == sum(store._sizes.values())


def test_mass_eviction_is_off_the_request_path(tmp_path):
    runs = [plant_run(tmp_path, payload=100) for _ in range(3000)]
    t0 = time.perf_counter()
    store = RunStore(tmp_path, max_bytes=50_000)
    started = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.write_run({"a": torch.ones(8)}, "pt")
    first_capture = time.perf_counter() - t0
    assert store.wait_janitor(60), "the janitor never finished"
    left = [r for r in runs if (tmp_path / r).exists()]
    assert store.used_bytes() <= 50_000 and store.used_bytes() == sum(store._sizes.values())
    assert len(left) == len(store._sizes) - 1, (len(left), len(store._sizes))
    assert not list((tmp_path / ".staging").glob("deleted-*")), "evicted runs left in the trash"
    assert first_capture < 1.0 and started < 10.0, (started, first_capture)


DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                                                  "failed writing file data/0: file write failed")])
def test_a_full_disk_says_no_space_left_on_device(tmp_path, monkeypatch, failure):
    from capture_conformance.reference_server import storage

    store = RunStore(tmp_path)

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(storage.torch, "save", full)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: DiskUsage(10, 10, 0))
    with pytest.raises(StorageFull, match="no space left on device"):
        store.write_run({"a": torch.ones(8)}, "pt")
    assert not [p for p in tmp_path.iterdir() if p.name != ".staging"]


# -- the small items: param null, slow clients, the drain, a key kept out of ps ----------------

import asyncio  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402

import psutil  # noqa: E402
import requests  # noqa: E402

from conftest import ServerProcess  # noqa: E402
from capture_conformance.reference_server.guards import BodySizeLimit  # noqa: E402


@pytest.mark.parametrize("body", [[], "text", 3])
def test_a_body_level_422_has_param_null(client, body):
    answer = client.post(CHAT, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] is None, answer.json()["error"]


def test_a_body_that_stops_arriving_is_408():
    sent: list[dict] = []

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app saw a body that never arrived")

    async def receive():
        await asyncio.sleep(30)

    async def send(message):
        sent.append(message)

    guard = BodySizeLimit(app, max_bytes=1 << 20, read_timeout_s=0.2)
    t0 = time.perf_counter()
    asyncio.run(guard({"type": "http", "headers": [(b"content-length", b"10")]}, receive, send))
    assert time.perf_counter() - t0 < 5
    assert sent[0]["status"] == 408 and b"--body-timeout-s" in sent[1]["body"], sent


def test_slow_headers_a_key_file_and_a_bounded_drain(tmp_path, tiny_model_dir):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-from-a-file\n")
    with ServerProcess(tmp_path, "--api-key-file", str(key_file), "--header-timeout-s", "1",
                       "--drain-timeout-s", "2") as server:
        cmdline = " ".join(psutil.Process(server.proc.pid).cmdline())
        assert "s3cret" not in cmdline, cmdline
        auth = {"Authorization": "Bearer s3cret-from-a-file"}
        assert requests.get(server.url + "/v1/models", timeout=10).status_code == 401
        assert requests.get(server.url + "/v1/models", headers=auth, timeout=10).status_code == 200

        host, port = server.url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)), timeout=10)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
        t0 = time.perf_counter()
        assert slow.recv(100) == b"", "the server answered headers that never ended"
        assert time.perf_counter() - t0 < 6
        slow.close()

        # A request in flight whose body never ends (the body timeout is 30 s); SIGTERM: the drain
        # gives it 2 s, then the process exits (uvicorn alone waits for it as long as the client).
        held = socket.create_connection((host, int(port)), timeout=10)
        held.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                     b"s3cret-from-a-file\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.3)  # the request is in: headers complete, its body being read
        t0 = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
        took = time.perf_counter() - t0
        held.close()
        assert took < 10, f"the drain took {took:.1f} s with --drain-timeout-s 2"
