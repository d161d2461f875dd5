"""The real `capture-server` process, on a free port, as users run it."""

from __future__ import annotations

import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from conftest import ServerProcess, chat_body


def test_health_is_503_until_the_model_is_usable_then_200(server_process):
    assert server_process.statuses[-1] == 200
    assert 503 in server_process.statuses, f"never saw 'loading': {server_process.statuses[:5]}"
    body = requests.get(server_process.url + "/health", timeout=5).json()
    budget = body.pop("capture_budget")  # issue 14: the capture budget in use
    layout = body.pop("layout")  # protocol 1.2: one process, one device, nothing turned off
    assert layout == {"tp_size": 1, "backend": "none", "devices": ["cpu"], "disabled": {}}, layout
    assert body == {"status": "ok", "loaded_models": ["tiny-qwen3"], "protocol": "1.1"}
    assert budget["limit_mb"] > 0 and budget["in_use_mb"] == 0 and budget["in_flight"] == 0, budget


def test_readme_flow_all_token_logits_download_and_argmax(server_process):
    """The issue's must-show, step by step: capture, download, load safely, argmax."""
    url = server_process.url
    body = requests.post(url + "/v1/chat/completions", json=chat_body(max_tokens=5, capture={"tokens": "all"}), timeout=60).json()
    n = body["usage"]["completion_tokens"]
    meta = body["activations_meta"]["_logits"]
    assert 1 <= n <= 5 and meta["shape"] == [1, n, 151936] and len(body["completion_token_ids"]) == n
    # The download goes through a sync endpoint, i.e. anyio's thread pool, after nnsight loaded.
    raw = requests.get(url + meta["url"], timeout=60)
    assert raw.status_code == 200, raw.text
    tensor = torch.load(io.BytesIO(raw.content), weights_only=True)
    assert list(tensor.shape) == meta["shape"] and str(tensor.dtype) == meta["dtype"]
    assert tensor[0].argmax(-1).tolist() == body["completion_token_ids"]


def test_openai_client_reads_activations_meta(server_process):
    from openai import OpenAI

    client = OpenAI(base_url=server_process.url + "/v1", api_key="unused")
    completion = client.chat.completions.create(
        model="tiny-qwen3",
        messages=[{"role": "user", "content": "Tell me a short story about a robot."}],
        max_tokens=4,
        temperature=0,
        extra_body={"capture": {"savepoints": ["lm_head", {"name": "h0", "selector": "model.layers[0]"}], "tokens": "all"}},
    )
    extra = completion.model_extra
    assert completion.usage.completion_tokens == len(extra["completion_token_ids"])
    n = completion.usage.completion_tokens
    assert extra["activations_meta"]["lm_head"]["shape"] == [1, n, 151936]
    assert extra["activations_meta"]["h0"]["shape"] == [1, n, 256]
    assert completion.choices[0].message.content


def test_health_is_answered_while_a_long_generation_runs(server_process):
    url = server_process.url
    long_body = chat_body(max_tokens=400, store_activations=True)
    done = threading.Event()
    result = {}

    def generate():
        result["status"] = requests.post(url + "/v1/chat/completions", json=long_body, timeout=300).status_code
        done.set()

    worker = threading.Thread(target=generate)
    worker.start()
    time.sleep(0.3)  # let the generation start; the assertion below does not depend on it
    health = requests.get(url + "/health", timeout=30)
    answered_during = not done.is_set()
    worker.join()
    assert health.status_code == 200 and result["status"] == 200
    assert answered_during, "/health was only answered after the generation finished"


def test_concurrent_requests_each_equal_their_solo_run(server_process):
    url = server_process.url
    prompts = ["Tell me a short story about a fox.", "Ben had 40 coins and gave away 12. How many coins are left?",
               "Say OK.", "Count to three."] * 2

    def run(content):
        body = requests.post(url + "/v1/chat/completions",
                             json=chat_body(content, 6, capture={"savepoints": ["model.layers[1]", "lm_head"]}), timeout=120)
        assert body.status_code == 200, body.text
        body = body.json()
        tensors = {n: torch.load(io.BytesIO(requests.get(url + m["url"], timeout=60).content), weights_only=True)
                   for n, m in body["activations_meta"].items()}
        return body["completion_token_ids"], tensors

    solo = {p: run(p) for p in set(prompts)}
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, prompts))
    for prompt, (ids, tensors) in zip(prompts, together):
        assert ids == solo[prompt][0]
        for name, tensor in tensors.items():
            torch.testing.assert_close(tensor, solo[prompt][1][name])
    assert len({tuple(ids) for ids, _ in together}) > 1, "different prompts should give different ids"


def test_a_model_that_cannot_load_stops_the_server_with_a_clear_error(tmp_path):
    server = ServerProcess(tmp_path, "--model", str(tmp_path / "no-such-dir"))
    try:
        code = server.proc.wait(120)
    finally:
        server.stop()
    assert code != 0
    assert "failed to load" in server.log()


def test_openai_client_streams_token_by_token(server_process):
    from openai import OpenAI

    client = OpenAI(base_url=server_process.url + "/v1", api_key="unused")
    kwargs = dict(model="tiny-qwen3", messages=[{"role": "user", "content": "Tell me a short story about a fox."}],
                  max_tokens=8, temperature=0, extra_body={"capture": {"tokens": "all"}})
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 6  # token by token, not one blob
    final = chunks[-1]
    assert final.usage.completion_tokens == 8
    assert final.model_extra["activations_meta"]["_logits"]["shape"] == [1, 8, 151936]
    assert final.model_extra["completion_token_ids"] == plain.model_extra["completion_token_ids"]


def test_openai_client_with_text_parts_and_a_developer_message_gets_a_capture(server_process):
    # Issue 14's "must show": what current OpenAI SDKs and agents send, captured by the reference server.
    assert re.search(r"capture budget: \d+ MiB of captures in flight \(50% of the \d+ MiB of memory available",
                     server_process.log_path.read_text()), server_process.log()  # the default, derived and stated
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=server_process.url + "/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model="tiny-qwen3",
        messages=[
            {"role": "developer", "content": "You are a storyteller."},
            {"role": "user", "content": [{"type": "text", "text": "Tell me a short story"},
                                         {"type": "text", "text": "about a fox."}]},
        ],
        max_tokens=4,
        temperature=0,
        extra_body={"capture": {"savepoints": ["lm_head"], "tokens": "all"}},
    )
    extra = completion.model_extra
    n = completion.usage.completion_tokens
    assert n == len(extra["completion_token_ids"]) > 0
    assert extra["activations_meta"]["lm_head"]["shape"] == [1, n, 151936]
    tensor = torch.load(extra["activations_meta"]["lm_head"]["file_path"])
    assert tensor[0].argmax(-1).tolist() == extra["completion_token_ids"]
    assert completion.choices[0].message.content

    with pytest.raises(openai.UnprocessableEntityError) as caught:  # and a refused part reads as such
        client.chat.completions.create(model="tiny-qwen3", max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}])
    assert "'input_audio'" in caught.value.body["message"]


def test_the_real_server_refuses_unlisted_loads_and_foreign_hosts(server_process):
    """Issue 20 item 9, as users start it: no key, bound to 127.0.0.1, default load policy."""
    url = server_process.url
    refused = requests.post(url + "/models/load", json={"model_id": "/etc/passwd"}, timeout=30)
    assert refused.status_code == 403 and "--allow-load" in refused.json()["detail"], refused.text
    assert "load policy: POST /models/load opens the built-in tiny models" in server_process.log_path.read_text()
    port = url.rsplit(":", 1)[1]
    rebound = requests.get(url + "/v1/models", headers={"Host": f"attacker.example:{port}"}, timeout=10)
    assert rebound.status_code == 421 and "DNS rebinding" in rebound.json()["detail"], rebound.text
    assert requests.get(url + "/v1/models", headers={"Host": f"localhost:{port}"}, timeout=10).status_code == 200


def test_help_says_what_loading_by_request_may_open():
    import subprocess
    import sys

    text = subprocess.run([sys.executable, "-m", "capture_conformance.reference_server", "--help"],
                          capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(text.split())
    assert "--allow-load PATH_OR_ID" in flat and "built-in tiny models" in flat
    assert "--allow-any-load" in flat and "ANY local directory" in flat and "hub id" in flat
