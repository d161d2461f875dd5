"""The .pt file written during the generation (reference_server/streamed_pt.py) is torch.save's file.

Unit: appended step by step, it loads (torch.load(weights_only=True) and the harness's torch-free
reader) to the very tensor, its pickle is byte for byte torch.save's, its data is 64-byte aligned,
and it refuses to stand for any other tensor. Through the server: an all-token .pt capture, written
this way, equals the same capture stored at the end (safetensors), bit for bit, early stops included,
and nothing is left in the staging area.
"""

from __future__ import annotations

import io
import struct
import zipfile

import pytest
import torch

from capture_conformance.harness.protocol.tensors import _read_pt_without_torch
from capture_conformance.reference_server.streamed_pt import StreamedPt, tensor_pickle
from conftest import chat_body

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _streamed(path, tensor: torch.Tensor, *, max_bytes: int = 10**6) -> StreamedPt:
    file = StreamedPt(path, max_bytes)
    for step in range(tensor.shape[1]):
        file.append(tensor[:, step:step + 1].clone())
    return file


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_streamed_file_is_the_file_torch_save_writes(tmp_path, dtype):
    tensor = torch.randn(1, 6, 40).to(dtype)
    file = _streamed(tmp_path / "x.pt", tensor)
    assert file.finish(tensor)
    loaded = torch.load(tmp_path / "x.pt", weights_only=True)
    assert loaded.dtype == dtype and torch.equal(loaded, tensor)
    reference = io.BytesIO()
    torch.save(tensor, reference)
    assert zipfile.ZipFile(tmp_path / "x.pt").read("archive/data.pkl") == zipfile.ZipFile(reference).read(
        "archive/data.pkl") == tensor_pickle([1, 6, 40], dtype)
    assert zipfile.ZipFile(tmp_path / "x.pt").testzip() is None  # every CRC right
    data = (tmp_path / "x.pt").read_bytes()
    name_len, extra_len = struct.unpack("<HH", data[26:30])
    assert (30 + name_len + extra_len) % 64 == 0  # the storage's data aligned as torch aligns it
    plain = _read_pt_without_torch(data, "x")  # the harness's light install reads it too
    assert plain.shape == (1, 6, 40) and plain.dtype == str(dtype)


def test_a_large_capture_is_written_as_zip64(tmp_path):
    tensor = torch.randn(1, 3, 16)
    file = _streamed(tmp_path / "x.pt", tensor, max_bytes=5 * 2**30)  # could exceed 4 GiB: zip64 from the start
    assert file.finish(tensor)
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True), tensor)


@pytest.mark.parametrize("shape,dtype", [([1, 5, 40], torch.float32), ([1, 7, 40], torch.float32),
                                         ([1, 6, 41], torch.float32), ([1, 6, 40], torch.float16)],
                         ids=["fewer steps", "more steps", "other width", "other dtype"])
def test_a_streamed_file_never_stands_for_another_tensor(tmp_path, shape, dtype):
    file = _streamed(tmp_path / "x.pt", torch.randn(1, 6, 40))
    assert not file.finish(torch.zeros(shape, dtype=dtype))
    assert not (tmp_path / "x.pt").exists()


def test_a_tensor_changed_after_its_steps_were_kept_is_not_stood_for(tmp_path):
    tensor = torch.randn(1, 6, 40)
    file = _streamed(tmp_path / "x.pt", tensor)
    changed = tensor.clone()
    changed[0, 3, 7] += 1e-3  # same shape and dtype, one value off: the bytes' CRC tells
    assert not file.finish(changed) and not (tmp_path / "x.pt").exists()


def test_a_step_that_does_not_fit_gives_the_file_up(tmp_path):
    file = StreamedPt(tmp_path / "x.pt", 10**6)
    file.append(torch.randn(1, 1, 40))
    file.append(torch.randn(1, 1, 39))
    file.append(torch.randn(1, 1, 40))
    assert file.error and not file.finish(torch.zeros(1, 2, 40))
    file.abort()
    assert not (tmp_path / "x.pt").exists()


# -- through the server ------------------------------------------------------------------------------

LOGITS = {"name": "_logits", "selector": "lm_head"}
LAYER = {"name": "layer", "selector": "model.layers[1]"}


def _capture(client, fmt: str, **extra) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    body = chat_body(max_tokens=12, **extra)
    body["capture"] = {"savepoints": [LOGITS, LAYER], "format": fmt}
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    out = {}
    for name, meta in data["activations_meta"].items():
        raw = client.get(meta["url"]).content
        out[name] = torch.load(io.BytesIO(raw), weights_only=True) if fmt == "pt" else load(raw)[name]
    return data, out


@pytest.mark.parametrize("extra", [{}, {"stop": ["the"]}, {"temperature": 0.9, "seed": 3}],
                         ids=["greedy", "stop string", "seeded sample"])
def test_a_capture_written_during_generation_equals_the_one_written_after(client, extra):
    streamed, a = _capture(client, "pt", **extra)
    written, b = _capture(client, "safetensors", **extra)
    assert streamed["completion_token_ids"] == written["completion_token_ids"]
    for name in (LOGITS["name"], LAYER["name"]):
        assert a[name].shape == b[name].shape and torch.equal(a[name], b[name]), name
    staging = client.app.state.service.store.root / ".staging"
    assert [p.name for p in staging.iterdir() if p.name.startswith("stream-")] == []


def test_the_streamed_path_is_the_one_taken(client, monkeypatch):
    from capture_conformance.reference_server import streamed_pt

    finished = []
    original = streamed_pt.StreamedPt.finish
    monkeypatch.setattr(streamed_pt.StreamedPt, "finish",
                        lambda self, tensor: finished.append((self.rows, original(self, tensor))) or finished[-1][1])
    data, tensors = _capture(client, "pt")
    steps = len(data["completion_token_ids"])
    assert finished == [(steps, True), (steps, True)], finished  # both savepoints came from the streamed files
