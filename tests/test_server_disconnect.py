"""A client that hangs up cancels its generation and stores nothing; the worker is free again at once (issue 15).

The tiny model ends its answers by itself after about 60 tokens, so the work a
hang-up must cancel is made long by numbers, not by length: sampled requests
(never batched together) with many savepoints each, several of them queued.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from conftest import ServerProcess, chat_body, stored_run_ids

CHAT = "/v1/chat/completions"
STORY = "Once upon a time, there was a fox who"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    server = ServerProcess(tmp_path_factory.mktemp("disconnect"))
    try:
        server.wait_ready()
        server.savepoints = requests.get(server.url + "/v1/models", timeout=30).json()["data"][0]["capture"]["savepoints"]
        yield server
    finally:
        server.stop()


def heavy(server, seed: int, **extra) -> dict:
    return chat_body(content=STORY, max_tokens=200, temperature=1.0, seed=seed,
                     capture={"savepoints": server.savepoints[:64]}, **extra)


def stored_runs(server) -> list[str]:
    return sorted(p.name for p in server.storage.iterdir() if not p.name.startswith("."))


def short_request_seconds(server) -> tuple[float, dict]:
    started = time.monotonic()
    response = requests.post(server.url + CHAT, json=chat_body(max_tokens=3, store_activations=True), timeout=120)
    assert response.status_code == 200, response.text
    return time.monotonic() - started, response.json()


def hang_up_after_sending(server, bodies: list[dict]) -> None:
    sockets = []
    for body in bodies:
        data = json.dumps(body).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        sockets.append(sock)
    time.sleep(0.5)  # the server has read them and the first generation runs; hanging up now is the point
    for sock in sockets:
        sock.close()


@pytest.fixture(scope="module")
def one_heavy(server) -> float:
    """Seconds one heavy request takes when served whole (~4-6 s here)."""
    started = time.monotonic()
    served = requests.post(server.url + CHAT, json=heavy(server, seed=1), timeout=120)
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] > 30, served.text
    return time.monotonic() - started


def test_abandoned_requests_free_the_worker_and_store_nothing(server, one_heavy):
    baseline, _ = short_request_seconds(server)
    before = stored_runs(server)

    hang_up_after_sending(server, [heavy(server, seed=s) for s in (2, 3, 4, 5)])
    freed_after, short = short_request_seconds(server)
    assert freed_after < baseline + 0.5 * one_heavy, (
        f"a 3-token request took {freed_after:.1f} s after 4 abandoned ones ({one_heavy:.1f} s each; "
        f"{baseline:.1f} s when idle): the worker was not freed")
    assert stored_runs(server) == sorted(before + [short["activation_run_id"]]), "an abandoned request stored a run"
    log = server.log_path.read_text()
    assert "generation cancelled" in log and "Traceback" not in log, log[-3000:]
    print(f"\nworker freed: short request {freed_after:.2f} s after hang-up of 4 x {one_heavy:.1f} s "
          f"(idle: {baseline:.2f} s)")


def test_a_stream_closed_midway_stops_its_generation(server, one_heavy):
    baseline, _ = short_request_seconds(server)
    with requests.post(server.url + CHAT, json=heavy(server, seed=1, stream=True), stream=True, timeout=120) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():  # three chunks: the generation is running
            seen += line.startswith(b"data:")
            if seen == 3:
                break
    # Leaving `with` before the end closed the connection; now measure the worker.
    freed_after, _ = short_request_seconds(server)
    assert freed_after < baseline + 0.5 * one_heavy, (
        f"a 3-token request took {freed_after:.1f} s after a stream was closed ({one_heavy:.1f} s of work, "
        f"{baseline:.1f} s when idle)")
    print(f"\nworker freed after a closed stream: {freed_after:.2f} s (work left: up to {one_heavy:.1f} s)")


def test_a_write_under_way_when_the_client_leaves_is_deleted_when_it_ends(client):
    import asyncio
    import threading

    import torch

    from capture_conformance.reference_server.types import Generation
    from capture_conformance.reference_server.schemas import ChatRequest

    service, store = client.app.state.service, client.app.state.store
    prepared = service.prepare_chat(ChatRequest(**chat_body(max_tokens=1, store_activations=True)))
    generation = Generation(token_ids=[5], tensors={"_logits": torch.zeros(1, 1, 8)})
    writing, release = threading.Event(), threading.Event()
    original = service._store

    def slow_store(*args):
        writing.set()
        release.wait(10)
        return original(*args)

    service._store = slow_store

    async def scenario():
        task = asyncio.ensure_future(service._store_async(generation, prepared))
        await asyncio.get_running_loop().run_in_executor(None, writing.wait, 10)
        task.cancel()  # the client hung up while its run was being written
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    service._writer.submit(lambda: None).result(10)  # the writer has finished, callbacks included
    assert stored_run_ids(store) == []
