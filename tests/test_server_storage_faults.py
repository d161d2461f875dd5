"""Storage under real faults: a full filesystem, a read-only one, planted paths, damaged runs, races (issue 15).

The full and read-only filesystems are real: a 1 MiB tmpfs mounted for the test
where the machine allows it (root), otherwise a 1 MiB file-size limit
(RLIMIT_FSIZE, so writes fail with EFBIG) for the full disk and a directory
without write permission for the read-only case. Never a fake exception.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from conftest import ServerProcess, chat_body, make_client, stored_run_ids
from capture_conformance.reference_server.storage import RunStore

CHAT = "/v1/chat/completions"
LIMIT = 1 << 20  # 1 MiB: a 2-token float32 logits capture (1.16 MiB) does not fit, a 1-token bfloat16 one does


def _mount(path: Path, *options: str) -> bool:
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=1m", *options)), "tmpfs", str(path)],
                            capture_output=True)
    return result.returncode == 0


@contextlib.contextmanager
def small_filesystem(path: Path):
    """A directory on a real 1 MiB tmpfs; yields True, or False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = _mount(path)
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def full_disk(path: Path):
    """Storage where a write past 1 MiB fails for real: ENOSPC on a tmpfs, else EFBIG from RLIMIT_FSIZE."""
    with small_filesystem(path) as mounted:
        if mounted:
            yield "tmpfs"
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
        try:
            yield "rlimit"
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_really_full_disk_is_507_leaves_nothing_and_a_small_capture_still_fits(registry, tmp_path, fmt):
    storage = tmp_path / "full"
    with full_disk(storage) as how:
        with make_client(registry, storage) as c:
            assert c.app.state.readiness.ready.wait(30)
            store = c.app.state.store
            big = c.post(CHAT, json=chat_body(max_tokens=2, capture={"format": fmt}))
            assert big.status_code == 507, f"{how}: {big.status_code} {big.text}"
            assert "could not store the capture" in big.json()["detail"]
            assert stored_run_ids(store) == [] and list((store.root / ".staging").iterdir()) == []
            assert c.get("/health").json()["status"] == "ok"
            small = c.post(CHAT, json=chat_body(max_tokens=1, capture={"format": fmt, "dtype": "bfloat16"}))
            assert small.status_code == 200, f"{how}: {small.text}"
            download = c.get(small.json()["activations_meta"]["_logits"]["url"])
            assert download.status_code == 200 and len(download.content) > 151936 * 2


def test_delete_on_a_read_only_filesystem_is_a_clear_403_and_the_run_stays(registry, tmp_path):
    storage = tmp_path / "ro"
    with small_filesystem(storage) as mounted, make_client(registry, storage) as c:
        assert c.app.state.readiness.ready.wait(30)
        body = c.post(CHAT, json=chat_body(max_tokens=1, capture={"dtype": "bfloat16"})).json()
        run = body["activation_run_id"]
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(storage)], check=True)
        else:
            storage.chmod(0o500)  # not root: without write permission the rename fails with EACCES
        try:
            response = c.delete(f"/v1/activations/{run}")
            assert response.status_code == 403, response.text
            assert "not writable" in response.json()["detail"] and run in response.json()["detail"]
            assert c.get(body["activations_meta"]["_logits"]["url"]).status_code == 200
            stored = c.post(CHAT, json=chat_body(max_tokens=1, store_activations=True))
            assert stored.status_code == 507, stored.text
        finally:
            if mounted:
                subprocess.run(["mount", "-o", "remount,rw", str(storage)], check=True)
            else:
                storage.chmod(0o700)
        assert c.delete(f"/v1/activations/{run}").status_code == 204


def _stored(client, **capture) -> dict:
    response = client.post(CHAT, json=chat_body(max_tokens=1, capture={"dtype": "bfloat16", **capture}))
    assert response.status_code == 200, response.text
    return response.json()


def test_planted_symlinks_and_manifest_paths_are_not_served(client, tmp_path):
    store = client.app.state.store
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "sp0.pt").write_bytes(b"host file")
    (secret / "manifest.json").write_text(json.dumps({"files": {"_logits": {"file": "sp0.pt"}}}))
    planted = "ab" * 16
    (store.root / planted).symlink_to(secret)  # a run-id-named symlink to a directory outside
    assert client.get(f"/v1/activations/{planted}/_logits").status_code == 404
    assert client.delete(f"/v1/activations/{planted}").status_code == 404 and secret.is_dir()

    body = _stored(client)
    run = body["activation_run_id"]
    manifest_path = store.root / run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for planted_file in ("../../secret/sp0.pt", str(secret / "sp0.pt"), "../" + run + "/../../secret/sp0.pt"):
        manifest["files"]["_logits"]["file"] = planted_file
        manifest_path.write_text(json.dumps(manifest))
        response = client.get(f"/v1/activations/{run}/_logits")
        assert response.status_code == 404 and b"host file" not in response.content, planted_file

    body = _stored(client)
    run, real = body["activation_run_id"], Path(body["activations_meta"]["_logits"]["file_path"])
    real.unlink()
    real.symlink_to(secret / "sp0.pt")  # the tensor file itself replaced by a symlink
    response = client.get(f"/v1/activations/{run}/_logits")
    assert response.status_code == 404 and b"host file" not in response.content


def test_malformed_entries_are_skipped_and_logged_at_startup(tmp_path, caplog):
    root = tmp_path / "store"
    good = RunStore(root)
    good_run, _ = good.write_run({"x": torch.zeros(4)}, "pt")
    names = {"stray file": "1" * 32, "dangling symlink": "2" * 32, "corrupt manifest": "3" * 32,
             "manifest not an object": "4" * 32, "no manifest": "5" * 32}
    (root / names["stray file"]).write_text("not a run")
    (root / names["dangling symlink"]).symlink_to(tmp_path / "nowhere")
    for key, text in (("corrupt manifest", "{not json"), ("manifest not an object", "[1, 2]")):
        (root / names[key]).mkdir()
        (root / names[key] / "manifest.json").write_text(text)
    (root / names["no manifest"]).mkdir()
    with caplog.at_level(logging.WARNING, logger="capture_conformance.reference_server.storage"):
        store = RunStore(root)
    assert list(store._sizes) == [good_run]
    for name in list(names.values())[:4]:
        assert name in caplog.text, f"{name} not logged: {caplog.text}"
    from capture_conformance.reference_server.errors import NotFound

    for name in names.values():
        with pytest.raises(NotFound):
            store.open_file(name, "x")
    handle, size = store.open_file(good_run, "x")
    with handle:
        assert len(handle.read()) == size > 0


def test_a_damaged_run_is_404_over_http_and_others_are_served(client):
    store = client.app.state.store
    damaged, fine = _stored(client), _stored(client)
    (store.root / damaged["activation_run_id"] / "manifest.json").write_text("{truncated")
    response = client.get(damaged["activations_meta"]["_logits"]["url"])
    assert response.status_code == 404 and "damaged" in response.json()["detail"]
    assert client.get(fine["activations_meta"]["_logits"]["url"]).status_code == 200


def test_delete_does_not_block_the_event_loop_while_a_write_holds_the_store(client):
    store = client.app.state.store
    run = _stored(client)["activation_run_id"]
    answers = {}

    def health():
        started = time.monotonic()
        answers["health"] = client.get("/health").status_code
        answers["health_s"] = time.monotonic() - started

    with store._lock:  # what a large write holds for seconds
        deleter = threading.Thread(target=lambda: answers.setdefault("delete", client.delete(f"/v1/activations/{run}")))
        deleter.start()
        time.sleep(0.2)  # the DELETE is now waiting for the lock
        prober = threading.Thread(target=health)
        prober.start()
        prober.join(2.0)  # a blocked event loop does not answer while the lock is held
        assert "delete" not in answers
    prober.join(10)
    deleter.join(10)
    assert answers.get("health") == 200 and answers["health_s"] < 1.0, answers
    assert answers["delete"].status_code == 204


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with ServerProcess(tmp_path_factory.mktemp("race")) as server:  # ready on entry, stopped on exit
        yield server


def test_concurrent_gets_and_deletes_of_the_same_runs_are_whole_or_404(server):
    runs = []
    for _ in range(6):  # 8 tokens of fp32 logits: 4.6 MiB per file, long enough to be read while deleted
        body = requests.post(server.url + CHAT, json=chat_body(max_tokens=8, store_activations=True), timeout=60).json()
        runs.append((body["activation_run_id"], body["activations_meta"]["_logits"]))

    def get(meta):
        response = requests.get(server.url + meta["url"], timeout=30)
        if response.status_code != 200:
            return response.status_code, None
        import io

        tensor = torch.load(io.BytesIO(response.content), weights_only=True)  # a cut body does not load
        return 200, list(tensor.shape)

    def delete(run_id):
        return requests.delete(f"{server.url}/v1/activations/{run_id}", timeout=30).status_code, None

    with ThreadPoolExecutor(24) as pool:
        jobs = []
        for run_id, meta in runs:  # the DELETEs land among the GETs of the same run
            jobs += [(run_id, "get", pool.submit(get, meta)) for _ in range(6)]
            jobs += [(run_id, "delete", pool.submit(delete, run_id)) for _ in range(3)]
            jobs += [(run_id, "get", pool.submit(get, meta)) for _ in range(6)]
        results = [(run_id, kind, job.result()) for run_id, kind, job in jobs]
    for run_id, meta in runs:
        gets = [r for rid, kind, r in results if rid == run_id and kind == "get"]
        deletes = [r[0] for rid, kind, r in results if rid == run_id and kind == "delete"]
        assert sorted(deletes) == [204, 404, 404], deletes
        for status, shape in gets:
            assert status == 404 or (status == 200 and shape == meta["shape"]), (status, shape)
    log = server.log_path.read_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
    assert requests.post(server.url + CHAT, json=chat_body(max_tokens=2), timeout=60).status_code == 200
