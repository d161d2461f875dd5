"""Issue 21, the server half: ``capture-server --tp N`` on torch.distributed (gloo on this CPU).

The default tier starts one TP=2 server of the embedded tiny-qwen3 (4 heads, 2 KV heads, MLP 512,
vocabulary 151,936: all divide by 2) and holds it to the single-process server: the same greedy ids,
and the head's and a block's captures within float32 tolerance, whole (full vocabulary and width).
The matrix tier kills or freezes a non-zero rank (the server must stop, never hang) and runs the
conformance profile against a TP=2 server.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID
from conftest import ServerProcess, chat_body, inner_pytest_env, make_client

# Sharded matmuls sum in another order: the issue measured 7.6e-6 on logits of magnitude ~30.
ATOL, RTOL = 1e-4, 1e-5
# The embeddings are vocabulary-parallel (nnsight cannot gather their output: served from layers.0's input),
# up_proj is column-parallel, lm_head gathers its output, a block's output is all-reduced.
SAVEPOINTS = ["model.embed_tokens", "lm_head", "model.layers.0", "model.layers.1.mlp.up_proj"]


def _tensors(base: str, response: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, meta in response["activations_meta"].items():
        data = httpx.get(base + meta["url"], timeout=30).content
        out[name] = torch.load(io.BytesIO(data), weights_only=True)
    return out


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the ranks torch.distributed.run started under the launcher."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e.split(b"=", 1)[1]) for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[rank] = pid
    return ranks


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory, tiny_model_dir):
    with ServerProcess(tmp_path_factory.mktemp("tp2"), "--tp", "2", startup_timeout_s=240) as server:
        yield server


@pytest.fixture(scope="module")
def single(registry, tmp_path_factory):
    """The single-process server (in-process, the same code path but for the ranks)."""
    with make_client(registry, tmp_path_factory.mktemp("tp1") / "storage") as client:
        assert client.app.state.readiness.ready.wait(30)
        yield client


def test_compat_shim_puts_get_parameter_plan_where_nnsight_imports_it(monkeypatch):
    import transformers.distributed.parallel_utils as parallel_utils
    import transformers.distributed.tensor_parallel as tensor_parallel

    from capture_conformance.reference_server.distributed import ensure_tp_compat

    monkeypatch.delattr(tensor_parallel, "_get_parameter_plan", raising=False)
    with pytest.raises(ImportError):
        from transformers.distributed.tensor_parallel import _get_parameter_plan  # noqa: F401
    ensure_tp_compat()
    from transformers.distributed.tensor_parallel import _get_parameter_plan

    assert _get_parameter_plan is parallel_utils._get_parameter_plan
    # A transformers that has it there already keeps its own.
    own = lambda *a, **k: None  # noqa: E731
    monkeypatch.setattr(tensor_parallel, "_get_parameter_plan", own)
    ensure_tp_compat()
    assert tensor_parallel._get_parameter_plan is own


def test_tp_flag_refuses_a_world_size_it_does_not_match(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "capture_conformance.reference_server", "--tp", "2",
                             "--storage-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--tp 2" in result.stderr and "WORLD_SIZE" in result.stderr, result.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "capture_conformance.reference_server", "--tp", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--tp" in bad.stderr, bad.stderr[-1000:]


def test_plain_server_reports_a_layout_of_one(single):
    health = single.get("/health").json()
    assert health["layout"]["tp_size"] == 1 and health["layout"]["devices"] == ["cpu"], health
    entry = single.get("/v1/models").json()["data"][0]
    assert entry["layout"]["tp_size"] == 1, entry


def test_tp2_server_reports_its_layout_and_refuses_other_models(tp_server):
    health = httpx.get(tp_server.url + "/health", timeout=10).json()
    layout = health["layout"]
    assert layout["tp_size"] == 2 and layout["backend"] == "gloo" and layout["devices"] == ["cpu", "cpu"], health
    assert set(layout["disabled"]) == {"mid_generation_cancellation", "models_load"}, layout
    models = httpx.get(tp_server.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == [TINY_MODEL_ID] and models[0]["layout"]["tp_size"] == 2
    load = httpx.post(tp_server.url + "/models/load", json={"model_id": "tiny-gpt2"}, timeout=30)
    assert load.status_code == 403 and "tensor-parallel" in load.json()["detail"], load.text
    again = httpx.post(tp_server.url + "/models/load", json={"model_id": TINY_MODEL_ID}, timeout=30)
    assert again.status_code == 200, again.text  # the loaded model is a no-op, as on any server
    log = tp_server.log()
    assert "turns off mid_generation_cancellation" in log and "turns off models_load" in log


def test_tp2_greedy_capture_equals_the_single_process_server(tp_server, single):
    body = chat_body("Tell me a short story about a fox.", max_tokens=6, capture={"savepoints": SAVEPOINTS})
    sharded = httpx.post(tp_server.url + "/v1/chat/completions", json=body, timeout=120)
    assert sharded.status_code == 200, sharded.text
    whole = single.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    sharded, whole = sharded.json(), whole.json()
    assert sharded["completion_token_ids"] == whole["completion_token_ids"]
    got = _tensors(tp_server.url, sharded)
    want = {name: torch.load(meta["file_path"], weights_only=True) for name, meta in whole["activations_meta"].items()}
    assert set(got) == set(SAVEPOINTS)
    for name in SAVEPOINTS:
        # Whole tensors: the full vocabulary / width, not one rank's half.
        assert got[name].shape == want[name].shape, (name, got[name].shape, want[name].shape)
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=RTOL, msg=name)
    ids = sharded["completion_token_ids"]
    assert got["lm_head"][0].argmax(-1).tolist() == ids


def test_tp2_batches_streams_and_samples_like_the_single_process_server(tp_server, single):
    import concurrent.futures

    prompts = ["Tell me about a cat.", "Count to three.", "What is a river?"]
    bodies = [chat_body(p, max_tokens=4, store_activations=True) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(tp_server.url + "/v1/chat/completions", json=b, timeout=120),
                                bodies))
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["completion_token_ids"] == single.post("/v1/chat/completions", json=body).json()[
            "completion_token_ids"]
    # Streamed text is the unstreamed text.
    body = chat_body("Count to three.", max_tokens=5)
    with httpx.stream("POST", tp_server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == single.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    # A seeded sample is drawn the same way on every rank, hence as the single-process server draws it.
    seeded = chat_body("Tell me about a cat.", max_tokens=8, temperature=1.5, seed=7, store_activations=True)
    tp = httpx.post(tp_server.url + "/v1/chat/completions", json=seeded, timeout=120).json()
    assert tp["completion_token_ids"] == single.post("/v1/chat/completions", json=seeded).json()["completion_token_ids"]


def _wait_gone_or_failed(server: ServerProcess, deadline_s: float) -> str:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return f"exited {server.process.returncode}"
        try:
            status = httpx.get(server.url + "/health", timeout=2).status_code
        except httpx.ConnectError:
            return "no longer listening"  # it was up: rank 0's HTTP server has stopped
        except httpx.HTTPError:  # a slow answer on a loaded machine: ask again
            status = None
        if status not in (200, None):
            return f"health {status}"
        time.sleep(0.5)
    pytest.fail(f"the server neither exited nor went unhealthy within {deadline_s} s:\n{server.log()[-3000:]}")


@pytest.mark.matrix
@pytest.mark.timeout(600)
def test_a_killed_rank_stops_the_server(tmp_path, tiny_model_dir):
    with ServerProcess(tmp_path, "--tp", "2", startup_timeout_s=240) as server:
        ranks = _rank_pids(server.process.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        _wait_gone_or_failed(server, 30)
        server.process.wait(timeout=60)  # and it does exit, non-zero
        assert server.process.returncode != 0
        assert "rank 1" in server.log(), server.log()[-3000:]


@pytest.mark.matrix
@pytest.mark.timeout(600)
def test_a_frozen_rank_is_found_by_the_heartbeat_and_the_server_stops(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("CAPTURE_TP_TIMEOUT_S", "5")  # the ping's deadline, so the test is quick
    with ServerProcess(tmp_path, "--tp", "2", startup_timeout_s=240) as server:
        ranks = _rank_pids(server.process.pid)
        os.kill(ranks[1], signal.SIGSTOP)  # alive to the launcher, deaf to the group: only the heartbeat can tell
        try:
            how = _wait_gone_or_failed(server, 30)
            server.process.wait(timeout=60)
            assert server.process.returncode != 0, how
            assert "did not answer the heartbeat" in server.log(), server.log()[-3000:]
        finally:
            try:
                os.kill(ranks[1], signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.mark.matrix
@pytest.mark.timeout(1200)
def test_tp2_server_passes_the_conformance_profile(tp_server, tmp_path):
    report_dir = tmp_path / "report"
    argv = [sys.executable, "-m", "capture_conformance.harness.pytest_plugin.cli", "--host", tp_server.url,
            "--model", TINY_MODEL_ID, "--profile", "core", "--report-dir", str(report_dir)]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=1100, env=inner_pytest_env())
    report = json.loads((report_dir / "conformance-report.json").read_text())
    failed = [f"{t['nodeid']}: {(t.get('message') or '')[:300]}" for t in report["tests"]
              if t["outcome"] in ("failed", "error")]
    assert result.returncode == 0 and report["passed"], "\n".join(failed) + result.stdout[-2000:]
    assert str(report["values"]["status"]).startswith("verified"), report["values"]
