"""Area dtype_size: stored dtype and format, ``numel``, ``size_mb``, the files themselves and their lifecycle."""

from __future__ import annotations

import math
import os

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.checks import (
    expect_close,
    expect_declared_precision,
    expect_finite,
    expect_shape,
    expect_tensor_matches_meta,
    expect_token_counts,
    expected_size_mb,
    plausible_file_size,
    rounding_tolerance,
)
from capture_conformance.harness.protocol.tensors import size_cap

pytestmark = pytest.mark.area("dtype_size")

STEPS = 3
DTYPES = ["float32", "bfloat16", "float16"]
FORMATS = ["pt", "safetensors"]
MATRIX = [(d, f) for d in DTYPES for f in FORMATS]


def _savepoints(layout) -> list[dict]:
    """The head and the first block, as the model's discovered layout names them."""
    return [{"name": "_logits", "selector": layout.head}, {"name": "layer_0", "selector": layout.block(0)}]


def _capture(capture_runs, layout, dtype, file_format, steps=STEPS, cached=True):
    completion = capture_runs.capture(prompts.STORY, steps, savepoints=_savepoints(layout), dtype=dtype,
                                      file_format=file_format, cached=cached)
    return completion, expect_token_counts(completion, expected_steps=steps)


@pytest.mark.parametrize("dtype,file_format", MATRIX)
def test_metadata_is_consistent(model_layout, capture_runs, ground_truth, dtype, file_format):
    completion, n = _capture(capture_runs, model_layout, dtype, file_format)
    for name, width in (("_logits", ground_truth.vocab_size), ("layer_0", ground_truth.hidden_size)):
        meta = completion.savepoint(name)
        expect_shape(meta, [1, n, width], ground_truth, steps=n, context=f"{dtype} {file_format}")
        assert meta.dtype == f"torch.{dtype}", f"`{name}` asked as {dtype}, metadata says dtype {meta.dtype!r}"
        assert meta.numel == math.prod(meta.shape), (
            f"`{name}`: numel {meta.numel} is not prod(shape {meta.shape}) = {math.prod(meta.shape)}")
        expected_mb = expected_size_mb(meta)
        assert abs(meta.size_mb - expected_mb) < 0.0051, (
            f"`{name}`: size_mb {meta.size_mb}, expected round(numel x itemsize / 2**20, 2) = {expected_mb}")
        assert meta.format == file_format, f"`{name}` asked as {file_format}, metadata says format {meta.format!r}"
        assert meta.tokens == "all", f"`{name}`: metadata says tokens {meta.tokens!r}, asked 'all'"
        expected_url = f"/v1/activations/{completion.run_id}/{name}"
        assert meta.url.endswith(expected_url), f"`{name}`: url {meta.url!r}, expected {expected_url!r}"
        assert meta.file_path, f"`{name}`: file_path is empty"


@pytest.mark.parametrize("dtype,file_format", MATRIX)
def test_stored_tensor_is_what_the_metadata_says(model_layout, capture_runs, dtype, file_format):
    completion, _ = _capture(capture_runs, model_layout, dtype, file_format)
    for name in ("_logits", "layer_0"):
        meta = completion.savepoint(name)
        data = capture_runs.file_bytes(completion, name)
        plausible_file_size(data, meta)
        assert len(data) <= size_cap(meta.numel, meta.dtype), (
            f"`{name}`: file has {len(data)} bytes for {meta.numel} x {meta.dtype} (a saved view of a larger tensor?)")
        tensor = capture_runs.tensor(completion, name)
        assert tensor.file_format == file_format, f"`{name}`: asked {file_format}, the file is {tensor.file_format}"
        expect_tensor_matches_meta(tensor, meta)
        if file_format == "safetensors":
            assert tensor.key == name, f"`{name}`: safetensors key is {tensor.key!r}, should be the savepoint's name"
        expect_finite(tensor, name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lower_precision_holds_the_same_values(model_layout, capture_runs, dtype):
    reference, _ = _capture(capture_runs, model_layout, "float32", "pt")
    lower, _ = _capture(capture_runs, model_layout, dtype, "pt")
    assert lower.token_ids == reference.token_ids, "the capture dtype changed the generated ids"
    rtol, atol = rounding_tolerance(dtype)
    for name in ("_logits", "layer_0"):
        expect_close(capture_runs.tensor(lower, name).values, capture_runs.tensor(reference, name).values,
                     what=f"`{name}` stored as {dtype} vs float32", rtol=rtol, atol=atol)


@pytest.mark.parametrize("file_format", FORMATS)
def test_float32_captures_hold_float32_precision(model_layout, capture_runs, server_model_dtype, file_format):
    """Spec 1.2: a float32 capture holds float32 values, not values rounded through float16 or bfloat16."""
    if server_model_dtype is None:
        pytest.skip("precision not verifiable: /v1/models states no capture.dtype for the model")
    if server_model_dtype not in ("float32", "torch.float32"):
        pytest.skip(f"the model computes in {server_model_dtype}: float32 captures of it hold that precision")
    completion, _ = _capture(capture_runs, model_layout, "float32", file_format)
    for name in ("_logits", "layer_0"):
        expect_declared_precision(capture_runs.tensor(completion, name), name, server_model_dtype)


def test_default_capture_is_float32_pt(capture_runs):
    completion = capture_runs.chat(prompts.STORY, STEPS, store_activations=True)
    meta = completion.savepoint("_logits")
    assert meta.dtype == "torch.float32", f"default capture dtype should be torch.float32, is {meta.dtype!r}"
    tensor = capture_runs.tensor(completion, "_logits")
    assert tensor.file_format == "pt", f"default capture format should be a torch.save file, is {tensor.file_format}"
    expect_tensor_matches_meta(tensor, meta)


@pytest.mark.managed_server
def test_file_path_is_the_served_file(model_layout, capture_runs):
    completion, _ = _capture(capture_runs, model_layout, "float32", "pt")
    for name in ("_logits", "layer_0"):
        meta = completion.savepoint(name)
        assert os.path.isfile(meta.file_path), f"`{name}`: file_path {meta.file_path!r} does not exist"
        with open(meta.file_path, "rb") as f:
            on_disk = f.read()
        assert on_disk == capture_runs.file_bytes(completion, name), (
            f"`{name}`: the file at file_path differs from what the url serves")


def test_deleting_a_run_removes_its_files(model_layout, capture_client, capture_runs, capture_target):
    completion, _ = _capture(capture_runs, model_layout, "float32", "pt", steps=2, cached=False)
    meta = completion.savepoint("_logits")
    assert capture_client.get(meta.url).status == 200, f"{meta.url} not downloadable before the delete"
    answer = capture_client.delete(f"/v1/activations/{completion.run_id}")
    assert answer.status == 204, f"DELETE of the run should answer 204: {answer.describe()}"
    after = capture_client.get(meta.url)
    assert after.status == 404, f"after DELETE, {meta.url} should be 404: {after.describe()}"
    if capture_target.managed:
        assert not os.path.exists(meta.file_path), f"after DELETE, {meta.file_path} is still on disk"


def test_dtype_and_format_matrix_matches_snapshot(model_layout, capture_runs, ground_truth, shape_snapshot):
    completion, _ = _capture(capture_runs, model_layout, "bfloat16", "safetensors")
    shape_snapshot.check(completion)


@pytest.mark.full
@pytest.mark.parametrize("tokens", ["first", "last"])
@pytest.mark.parametrize("dtype,file_format", MATRIX)
def test_first_and_last_in_every_dtype_and_format(model_layout, capture_runs, ground_truth, dtype, file_format, tokens):
    completion = capture_runs.capture(prompts.STORY, 16, savepoints=_savepoints(model_layout), dtype=dtype, file_format=file_format,
                                      tokens=tokens)
    n = expect_token_counts(completion, expected_steps=16)
    for name, width in (("_logits", ground_truth.vocab_size), ("layer_0", ground_truth.hidden_size)):
        meta = completion.savepoint(name)
        expect_shape(meta, [1, 1, width], ground_truth, steps=n, context=f"tokens {tokens}, {dtype} {file_format}")
        tensor = capture_runs.tensor(completion, name)
        expect_tensor_matches_meta(tensor, meta)
        expect_finite(tensor, name)
