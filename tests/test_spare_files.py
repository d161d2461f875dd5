"""Deleted runs' files written over by later captures (reference_server/spare_files.py).

What must hold: a recycled file holds exactly the new tensor and nothing of the old one
(it loads equal, and its length is what a fresh write gives); a file somebody still
reads is never written over; the pool keeps its bound, counts against the storage
limit and goes first when room is needed; a restart keeps none of it.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from capture_conformance.reference_server.spare_files import SpareFiles
from capture_conformance.reference_server.storage import RunStore

MIB = 2**20


def _tensor(seed: int, steps: int = 8, width: int = 4096) -> torch.Tensor:
    return torch.randn(1, steps, width, generator=torch.Generator().manual_seed(seed))


def _write(store: RunStore, tensor: torch.Tensor, fmt: str = "pt"):
    run_id, stored = store.write_run({"_logits": tensor}, fmt)
    return run_id, stored["_logits"].path


def _on_disk(root) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_deleted_runs_file_is_written_over_and_holds_only_the_new_tensor(tmp_path, fmt):
    store = RunStore(tmp_path)
    big, small = _tensor(1, steps=16), _tensor(2, steps=5)
    old_id, old_path = _write(store, big, fmt)
    old_inode = os.stat(old_path).st_ino
    store.delete_run(old_id)
    assert len(store._spares) == 1 and store.spare_bytes() == os.stat(next((tmp_path / ".staging" / "spare").iterdir())).st_size

    new_id, new_path = _write(store, small, fmt)
    assert os.stat(new_path).st_ino == old_inode  # the same file, its pages reused
    assert store.spare_bytes() == 0
    loaded = torch.load(new_path, weights_only=True) if fmt == "pt" else load_file(new_path)["_logits"]
    assert torch.equal(loaded, small)
    # Nothing of the 16-step tensor is left behind the 5-step one: the length is a fresh write's.
    fresh = RunStore(tmp_path / "fresh", recycle_bytes=0)
    _, fresh_path = _write(fresh, small, fmt)
    assert os.path.getsize(new_path) == os.path.getsize(fresh_path)
    assert store.used_bytes() == sum(os.path.getsize(p) for p in (tmp_path / new_id).iterdir())


def test_a_file_being_downloaded_is_never_written_over(tmp_path):
    store = RunStore(tmp_path)
    first = _tensor(3)
    run_id, path = _write(store, first)
    handle, size = store.open_file(run_id, "_logits")  # a download in progress (routes.get_activation)
    inode = os.fstat(handle.fileno()).st_ino
    try:
        store.delete_run(run_id)
        assert len(store._spares) == 0  # open elsewhere: deleted, not kept
        _, new_path = _write(store, _tensor(4))
        assert os.stat(new_path).st_ino != inode
        data = handle.read()
    finally:
        handle.close()
    assert len(data) == size
    import io

    assert torch.equal(torch.load(io.BytesIO(data), weights_only=True), first)  # the reader got the old run whole


def test_the_pool_keeps_its_bound_and_zero_turns_it_off(tmp_path):
    one = _tensor(5)  # 128 KiB of float32
    store = RunStore(tmp_path / "a", recycle_bytes=int(1.5 * one.numel() * 4))
    ids = [_write(store, one)[0] for _ in range(3)]
    for run_id in ids:
        store.delete_run(run_id)
    assert len(store._spares) == 1  # a second file would pass the bound
    assert _on_disk(tmp_path / "a") == store.spare_bytes()

    off = RunStore(tmp_path / "b", recycle_bytes=0)
    off.delete_run(_write(off, one)[0])
    assert len(off._spares) == 0 and _on_disk(tmp_path / "b") == 0


def _run_bytes(tmp_path, tensor: torch.Tensor) -> int:
    """What a run of ``tensor`` takes on disk: its file and its manifest."""
    probe = RunStore(tmp_path / f"probe-{tensor.shape[1]}", recycle_bytes=0)
    run_id, _ = _write(probe, tensor)
    return _on_disk(tmp_path / f"probe-{tensor.shape[1]}" / run_id)


def test_spares_count_against_the_storage_limit_and_go_before_any_run(tmp_path):
    one, two = _tensor(6, steps=8), _tensor(7, steps=16)
    one_bytes, two_bytes = _run_bytes(tmp_path, one), _run_bytes(tmp_path, two)
    # Room for a run of one and a run of two, and half a spare: the two spares must go for the second to fit.
    limit = one_bytes + two_bytes + one_bytes // 2
    store = RunStore(tmp_path / "s", max_bytes=limit)
    keep = _write(store, one)[0]
    for run_id in [_write(store, one)[0], _write(store, one)[0]]:
        store.delete_run(run_id)
    assert len(store._spares) == 2
    new = _write(store, two)[0]
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.name != ".staging") == sorted([keep, new])
    assert _on_disk(tmp_path / "s") <= limit, (_on_disk(tmp_path / "s"), limit)


def test_a_restart_keeps_no_spare(tmp_path):
    store = RunStore(tmp_path)
    store.delete_run(_write(store, _tensor(9))[0])
    assert store.spare_bytes() > 0
    again = RunStore(tmp_path)
    assert again.spare_bytes() == 0 and _on_disk(tmp_path) == 0


def test_evicted_runs_are_recycled_too(tmp_path):
    one = _tensor(10)
    run_bytes = _run_bytes(tmp_path, one)
    unlimited = RunStore(tmp_path / "s")
    for _ in range(3):
        _write(unlimited, one)
    # Restarted over its limit: the janitor evicts the oldest runs with no write to take their files.
    store = RunStore(tmp_path / "s", max_bytes=int(1.5 * run_bytes))
    assert store.wait_janitor()
    assert len(store._spares) == 1 and store.spare_bytes() == os.path.getsize(probe_file(tmp_path, one))
    assert len(list((tmp_path / "s" / ".staging" / "spare").iterdir())) == 1


def probe_file(tmp_path, tensor: torch.Tensor):
    """The tensor file of the probe run _run_bytes wrote for ``tensor``."""
    return next((tmp_path / f"probe-{tensor.shape[1]}").glob("*/sp0.pt"))


def test_the_pool_refuses_what_is_not_a_plain_closed_file(tmp_path):
    pool = SpareFiles(tmp_path / "spare", 10 * MIB)
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "target").write_bytes(b"x" * 100)
    os.symlink(tmp_path / "target", tmp_path / "link")
    reader = open(tmp_path / "target", "rb")
    try:
        assert not pool.keep(tmp_path / "dir")
        assert not pool.keep(tmp_path / "fifo")
        assert not pool.keep(tmp_path / "link")
        assert not pool.keep(tmp_path / "target")  # open
    finally:
        reader.close()
    assert pool.keep(tmp_path / "target") and not (tmp_path / "target").exists()
    assert not pool.take(tmp_path / "missing-dir" / "x", 10)  # a failed rename gives no file
    assert len(pool) == 0 and pool.bytes == 0


def _paused_download(url: str):
    """A GET whose client reads its headers and then stops: a small receive buffer keeps the server's file open.

    Returns (first bytes of the body, a function reading the rest, the body's length).
    """
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # before connecting: the window stays small
    sock.connect((parts.hostname, parts.port))
    sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}\r\nConnection: close\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1 << 16)
    head, body = head.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))

    def rest() -> bytes:
        data = bytearray(body)
        while len(data) < length:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        sock.close()
        return bytes(data)

    return rest, length


def test_through_the_server_a_download_outlives_its_delete_and_the_next_capture(tmp_path, tiny_model_dir):
    """A real server: a download paused after its headers, its run DELETEd, then a capture of the same size.

    The new capture would be written over the deleted run's file if the pool took a file
    still being read; the paused download must still get the old bytes, whole.
    """
    import io

    import requests

    from conftest import ServerProcess, chat_body

    chat = "/v1/chat/completions"
    body = chat_body(max_tokens=32, store_activations=True)  # 19 MiB of logits, against 4 MiB of socket buffers
    with ServerProcess(tmp_path) as server:
        first = requests.post(server.url + chat, json=body, timeout=120).json()
        url = server.url + first["activations_meta"]["_logits"]["url"]
        expected = requests.get(url, timeout=60).content
        rest, length = _paused_download(url)
        assert requests.delete(f"{server.url}/v1/activations/{first['activation_run_id']}",
                               timeout=60).status_code == 204
        other = chat_body("Tell me a short story about an owl.", max_tokens=32, store_activations=True)  # other bytes
        second = requests.post(server.url + chat, json=other, timeout=120).json()
        assert second["activations_meta"]["_logits"]["shape"] == first["activations_meta"]["_logits"]["shape"]
        got = rest()
        assert length == len(expected) and got == expected
        # With nobody reading, the next DELETE does give its file to the capture after it.
        assert requests.delete(f"{server.url}/v1/activations/{second['activation_run_id']}",
                               timeout=60).status_code == 204
        spare = server.storage_dir / ".staging" / "spare"
        assert len(list(spare.iterdir())) == 1
        third = requests.post(server.url + chat, json=body, timeout=120).json()
        assert list(spare.iterdir()) == []
        data = requests.get(server.url + third["activations_meta"]["_logits"]["url"], timeout=60).content
        assert list(torch.load(io.BytesIO(data), weights_only=True).shape) == third["activations_meta"]["_logits"]["shape"]
