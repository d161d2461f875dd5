"""The harness's own safety and readability, against scripted servers (no model, no server process)."""

from __future__ import annotations

import io
import os
import pickle
import time
import zipfile

import numpy as np
import pytest

from capture_conformance.harness.protocol.client import CaptureClient, ServerFault
from capture_conformance.harness.pytest_plugin.report import CaseResult, summarize
from capture_conformance.harness.protocol.responses import Completion
from capture_conformance.harness.pytest_plugin.snapshots import model_slug, symbolic_shape
from capture_conformance.harness.protocol.tensors import _read_pt_without_torch, load_tensor_file, size_cap
from legacy_server import ScriptedServer


def _fault(call) -> str:
    with pytest.raises(ServerFault) as info:
        call()
    return str(info.value)


# -- garbage answers --------------------------------------------------------------------------------


def test_html_answer_is_a_readable_failure():
    page = b"<!DOCTYPE html><html><body><h1>Welcome to nginx!</h1></body></html>"
    with ScriptedServer({("GET", "/health"): lambda r: r.reply(200, raw=page, ctype="text/html")}) as server:
        message = _fault(lambda: CaptureClient(server.url).health().json())
    assert message.startswith("GET /health answered 200 text/html, not JSON: <!DOCTYPE html>"), message


def test_truncated_json_is_a_readable_failure():
    with ScriptedServer({("POST", "/v1/chat/completions"):
                         lambda r: r.reply(200, raw=b'{"id": "x", "choices": [{"ind')}) as server:
        message = _fault(lambda: CaptureClient(server.url).chat("m", "hi", 1).ok_json())
    assert "POST /v1/chat/completions answered 200 with invalid JSON" in message, message
    assert '{"id": "x", "choices": [{"ind' in message, message


def test_json_under_a_wrong_content_type_is_a_readable_failure():
    with ScriptedServer({("GET", "/health"): lambda r: r.reply(200, {"status": "ok"}, ctype="text/plain")}) as server:
        message = _fault(lambda: CaptureClient(server.url).health().json())
    assert "answered 200 text/plain, not JSON" in message, message


def test_unexpected_status_quotes_the_body():
    with ScriptedServer({("GET", "/v1/models"): lambda r: r.reply(500, {"detail": "boom"})}) as server:
        message = _fault(lambda: CaptureClient(server.url).models().ok_json())
    assert message == 'expected 200; GET /v1/models answered 500 (application/json): {"detail": "boom"}', message


def test_missing_response_fields_are_readable_failures():
    completion = Completion({"choices": []}, {})
    assert "has no 'usage'" in _fault(lambda: completion.usage)
    assert "exactly one choice" in _fault(lambda: completion.choice)
    assert "no activations_meta" in _fault(lambda: completion.meta)
    bad = Completion({"usage": {"prompt_tokens": "3", "completion_tokens": 1, "total_tokens": 4}}, {})
    assert "usage.prompt_tokens should be int, got '3'" in _fault(lambda: bad.usage)


# -- time and size limits ---------------------------------------------------------------------------


def test_a_hanging_server_fails_within_the_timeout_naming_the_endpoint():
    with ScriptedServer({("POST", "/v1/chat/completions"): lambda r: time.sleep(5)}) as server:
        started = time.monotonic()
        message = _fault(lambda: CaptureClient(server.url, timeout_s=0.5).chat("m", "hi", 1))
        elapsed = time.monotonic() - started
    assert message == "POST /v1/chat/completions got no answer within 0.5 s (--request-timeout)", message
    assert elapsed < 3, f"the timeout took {elapsed:.1f} s"


def test_an_unreachable_server_says_so():
    with ScriptedServer({}) as server:
        url = server.url
    message = _fault(lambda: CaptureClient(url).health())
    assert message == f"GET /health: cannot reach {url}: connection refused", message


def _big_file(with_length: bool):
    def handler(r):
        r.send_response(200)
        r.send_header("Content-Type", "application/octet-stream")
        if with_length:
            r.send_header("Content-Length", str(8 * 2**20))
        r.end_headers()
        for _ in range(128):  # 8 MiB, far above the 1 MiB cap
            r.wfile.write(b"\0" * 65536)
    return handler


@pytest.mark.parametrize("with_length", [True, False], ids=["announced", "streamed"])
def test_downloads_are_capped(with_length):
    with ScriptedServer({("GET", "/v1/activations/r/x"): _big_file(with_length)}) as server:
        message = _fault(lambda: CaptureClient(server.url).download("/v1/activations/r/x", max_bytes=2**20, what="x"))
    assert "cap of 1048576 bytes" in message, message


def test_size_cap_is_the_advertised_payload_plus_a_small_margin():
    payload = 5 * 151936 * 4
    assert payload < size_cap(5 * 151936, "torch.float32") < payload * 1.02 + 65536 + 1


def test_downloads_from_another_host_are_refused():
    with ScriptedServer({}) as server:
        message = _fault(lambda: CaptureClient(server.url).download("http://example.invalid/x", max_bytes=10, what="x"))
    assert "points away from the server under test" in message, message


# -- safe loading ---------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_style_zip(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    return buffer.getvalue()


def test_a_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    exploit = pickle.dumps(_Exploit(str(marker)), protocol=2)
    for data in (_torch_style_zip(exploit), exploit, pickle.dumps(_Exploit(str(marker)))):
        message = _fault(lambda: load_tensor_file(data, what="savepoint 'x'"))
        assert message.startswith("savepoint 'x': "), message
        assert not marker.exists(), f"the pickle ran: {message}"
    message = _fault(lambda: _read_pt_without_torch(_torch_style_zip(exploit), "savepoint 'x'"))
    assert "posix.system is not allowed" in message or "system is not allowed" in message, message
    assert not marker.exists()


def test_a_pt_file_holding_something_else_than_a_tensor_is_refused():
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save({"_logits": torch.zeros(1, 1, 3)}, buffer)
    assert "must hold one tensor, it holds a dict" in _fault(lambda: load_tensor_file(buffer.getvalue(), what="x"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_pt_and_safetensors_files_load_with_their_dtype_and_shape(dtype):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    tensor = torch.randn(1, 3, 7).to(getattr(torch, dtype))
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    loaded = [load_tensor_file(buffer.getvalue(), what="x", declared_format="pt"),
              _read_pt_without_torch(buffer.getvalue(), "x"),
              load_tensor_file(save({"_logits": tensor}), what="x", declared_format="safetensors")]
    for item in loaded:
        assert item.dtype == f"torch.{dtype}" and item.shape == (1, 3, 7)
        assert np.array_equal(item.values, tensor.float().numpy())
    assert loaded[2].key == "_logits"
    wrong = _fault(lambda: load_tensor_file(buffer.getvalue(), what="x", declared_format="safetensors"))
    assert "metadata says format 'safetensors' but the file is pt" in wrong


# -- snapshots and report ------------------------------------------------------------------------------


def test_symbolic_shapes_name_known_sizes_and_keep_the_rest():
    dims = {"V": 151936, "H": 256}
    assert symbolic_shape([1, 5, 151936], steps=5, tokens="all", dims=dims) == [1, "N", "V"]
    assert symbolic_shape([1, 1, 256], steps=5, tokens="last", dims=dims) == [1, 1, "H"]
    assert symbolic_shape([1, 5, 128], steps=5, tokens="all", dims=dims) == [1, "N", 128]
    assert model_slug("Qwen/Qwen3-0.6B") == "qwen--qwen3-0.6b"


def test_capture_level_stops_at_the_first_failing_area():
    def results(**outcomes):
        return [CaseResult(f"suites/test_{area}.py::t", area, outcome) for area, outcome in outcomes.items()]

    everything = dict.fromkeys(["health", "models", "chat", "single_token", "multi_token", "savepoints",
                                "dtype_size", "out_of_order", "bad_input", "values"], "passed")
    assert summarize(results(**everything)).capture_level == "full"
    assert summarize(results(**everything)).values == "verified"
    assert summarize(results(**{**everything, "values": "failed"})).capture_level == "savepoints"
    assert summarize(results(**{**everything, "multi_token": "failed"})).capture_level == "single-token"
    assert summarize(results(**{**everything, "single_token": "failed"})).capture_level == "none"
    assert summarize(results(**{**everything, "bad_input": "failed"})).capture_level == "savepoints"
    assert not summarize(results(**{**everything, "bad_input": "failed"})).passed


def test_values_not_verifiable_says_shapes_only_and_is_no_silent_pass():
    areas = ["health", "models", "chat", "single_token", "multi_token", "savepoints", "dtype_size", "out_of_order",
             "bad_input"]
    results = [CaseResult(f"suites/test_{a}.py::t", a, "passed") for a in areas]
    reason = "values not verifiable: torch is not installed (light install)"
    unverified = results + [CaseResult("suites/test_values.py::t", "values", "skipped", message=reason),
                            CaseResult("suites/test_values.py::u", "values", "passed")]
    summary = summarize(unverified)
    assert summary.capture_level == "full (shapes only)"
    assert summary.values == reason
    # a skip for another reason is not "unverifiable": the area is simply not clean, full is not reached
    other = results + [CaseResult("suites/test_values.py::t", "values", "skipped", message="something else")]
    assert summarize(other).capture_level == "savepoints"
    assert summarize(other).values == "not run"


# -- ground truth ---------------------------------------------------------------------------------------


def test_config_keys_of_every_family_are_read_through_the_alias_table():
    from capture_conformance.harness.protocol.ground_truth import config_numbers_by_alias

    gpt2 = {"n_embd": 48, "n_layer": 3, "n_inner": None, "vocab_size": 2048, "n_head": 4}
    assert config_numbers_by_alias(gpt2) == {"vocab_size": 2048, "hidden_size": 48, "num_layers": 3}
    opt = {"hidden_size": 32, "num_hidden_layers": 2, "ffn_dim": 128, "vocab_size": 50}
    assert config_numbers_by_alias(opt)["intermediate_size"] == 128
    t5_like = {"d_model": 64, "num_layers": 6, "d_ff": 256, "vocab_size": 99}
    assert config_numbers_by_alias(t5_like) == {"vocab_size": 99, "hidden_size": 64, "num_layers": 6,
                                                "intermediate_size": 256}


def test_a_gpt2_config_gives_independent_ground_truth_with_every_sources_named(tmp_path):
    transformers = pytest.importorskip("transformers")
    from capture_conformance.harness.protocol.ground_truth import SOURCE_MODULE_TREE, resolve_ground_truth

    transformers.GPT2Config(n_embd=48, n_layer=3, n_head=4, n_inner=None, vocab_size=2048).save_pretrained(tmp_path)
    truth = resolve_ground_truth(str(tmp_path), server_capture_block=lambda: {"hidden_size": 1, "num_layers": 1})
    assert (truth.vocab_size, truth.hidden_size, truth.num_layers) == (2048, 48, 3)
    # n_inner null means 4 x n_embd in GPT-2: the module tree says so, the config does not.
    assert truth.intermediate_size == 4 * 48 and truth.sources["intermediate_size"] == SOURCE_MODULE_TREE
    assert truth.independent and truth.from_server == []
    assert all(source.startswith("model config") for k, source in truth.sources.items() if k != "intermediate_size")


def test_ground_truth_prefers_the_model_config_then_the_options_then_the_server(tmp_path):
    from capture_conformance.harness.protocol.ground_truth import SOURCE_OPTIONS, SOURCE_SERVER, resolve_ground_truth

    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        '{"text_config": {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 3}, "eos_token_id": [7, 8]}')
    server_block = {"vocab_size": 5, "hidden_size": 5, "num_layers": 5}

    from_config = resolve_ground_truth(str(model_dir), server_capture_block=lambda: server_block)
    assert (from_config.vocab_size, from_config.hidden_size, from_config.num_layers) == (1000, 64, 3)
    assert from_config.source.startswith("model config") and from_config.independent
    assert from_config.eos_token_ids == [7, 8]
    assert from_config.tokenizer is None and "not loadable" in from_config.tokenizer_note  # no tokenizer files

    with pytest.raises(ValueError, match="config.json says 1000"):
        resolve_ground_truth(str(model_dir), expect_vocab=999)

    from_options = resolve_ground_truth("org/not-here", expect_vocab=32000, expect_hidden=4096,
                                        server_capture_block=lambda: server_block)
    assert (from_options.vocab_size, from_options.hidden_size) == (32000, 4096)
    assert from_options.source.startswith(SOURCE_OPTIONS) and "num_layers from server" in from_options.source
    # One number from the server makes the whole ground truth not independent (issue 18).
    assert from_options.num_layers == 5 and not from_options.independent
    assert from_options.from_server == ["num_layers"] and from_options.sources["vocab_size"] == SOURCE_OPTIONS


    from_server = resolve_ground_truth("org/not-here", server_capture_block=lambda: server_block)
    assert from_server.from_server == ["vocab_size", "hidden_size", "num_layers"]
    assert from_server.source == SOURCE_SERVER and not from_server.independent
    assert from_server.tokenizer is None and "no local copy" in from_server.tokenizer_note


class _ClosingServer:
    """Closes the first ``drops`` requests' connections without a byte of answer, then answers 200."""

    def __init__(self, drops: int):
        import socket
        import threading

        self.drops, self.requests = drops, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if not data:
                    continue
                self.requests += 1
                if self.requests <= self.drops:
                    continue  # closed: the client sees "Remote end closed connection without response"
                body = b'{"status": "ok"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def close(self):
        self.sock.close()


def test_a_connection_closed_before_any_answer_is_sent_once_more():
    """The kept-alive connection a server closed as idle just as a request went out: sent again, once."""
    server = _ClosingServer(drops=1)
    try:
        answer = CaptureClient(server.url, timeout_s=10).get("/health")
        assert answer.status == 200 and server.requests == 2
    finally:
        server.close()


def test_a_server_that_drops_the_request_itself_is_reported_after_one_resend():
    server = _ClosingServer(drops=10)
    try:
        with pytest.raises(ServerFault, match="closed connection without response"):
            CaptureClient(server.url, timeout_s=10).post("/v1/chat/completions", json={})
        assert server.requests == 2
    finally:
        server.close()
