"""Assertions the suites share, each with a message that says what the server answered."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from harness.client import Answer, CaptureClient
from harness.ground_truth import GroundTruth
from harness.responses import Completion, SavepointMeta
from harness.tensors import LoadedTensor, itemsize


def symbolic(shape: list[int] | tuple[int, ...], truth: GroundTruth) -> str:
    """``[1, 5, 151936]`` -> ``[1,5,V]``: sizes named where they equal a known dimension."""
    names = {v: k for k, v in truth.dims().items()}
    parts = []
    for position, size in enumerate(shape):
        if position == len(shape) - 1 and size in names:
            parts.append(names[size])
        else:
            parts.append(str(size))
    return "[" + ",".join(parts) + "]"


def expect_shape(meta: SavepointMeta, expected: list[int], truth: GroundTruth, *, steps: int, context: str) -> None:
    shape = meta.shape
    if shape == expected:
        return
    width = expected[-1]
    if (len(shape) == 3 and shape[1] == 1 and expected[1] > 1 and shape[2] == width
            and meta.raw.get("tokens", "all") == "all"):
        raise AssertionError(
            f"single-token capture only: `{meta.name}` is {symbolic(shape, truth)} for {steps} generated tokens "
            f"({context}); expected {symbolic(expected, truth)} = {expected}"
        )
    raise AssertionError(
        f"`{meta.name}` has shape {shape} = {symbolic(shape, truth)}, expected {expected} = "
        f"{symbolic(expected, truth)} ({context}, {steps} generated tokens)"
    )


def expect_token_counts(completion: Completion, *, expected_steps: int | None = None) -> int:
    """``usage.completion_tokens == len(completion_token_ids)`` (== ``expected_steps``); returns N."""
    usage = completion.usage
    ids = completion.token_ids
    if usage.completion_tokens != len(ids):
        raise AssertionError(
            f"usage.completion_tokens is {usage.completion_tokens} but completion_token_ids has {len(ids)} ids: {ids}"
        )
    if expected_steps is not None and len(ids) != expected_steps:
        raise AssertionError(
            f"expected {expected_steps} generated tokens (max_tokens={completion.request.get('max_tokens')} on a "
            f"prompt that writes on), got {len(ids)} (finish_reason={completion.finish_reason!r}): {ids}"
        )
    return len(ids)


def argmax_per_step(tensor: LoadedTensor) -> list[int]:
    values = tensor.values
    if values.ndim != 3 or values.shape[0] != 1:
        raise AssertionError(f"expected a [1, N, V] tensor, got shape {list(values.shape)}")
    return [int(i) for i in values[0].argmax(axis=-1)]


def expect_argmax_matches(tensor: LoadedTensor, ids: list[int], *, name: str, first_step: int = 0) -> None:
    """Greedy contract: ``argmax(logits[0, i]) == completion_token_ids[first_step + i]``."""
    got = argmax_per_step(tensor)
    want = ids[first_step : first_step + len(got)]
    if got == want:
        return
    if len(got) > len(ids) - first_step:
        raise AssertionError(
            f"`{name}` has {len(got)} captured steps but there are {len(ids)} completion_token_ids "
            f"(another request's tensors?): argmax {got[:16]} vs ids {ids[:16]}"
        )
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    hint = ""
    if len(got) > 1 and got[:-1] == ids[first_step + 1 : first_step + len(got)]:
        hint = " (step i holds step i+1: logits shifted by one step)"
    elif len(got) > 1 and got[1:] == ids[first_step : first_step + len(got) - 1]:
        hint = " (step i holds step i-1: logits lag one step, or completion_token_ids miss the first token)"
    elif len(got) != len(want):
        hint = f" ({len(got)} captured steps for {len(want)} ids)"
    raise AssertionError(
        f"greedy argmax of `{name}` differs from completion_token_ids at steps {bad[:8]}{hint}: "
        f"argmax {got[:16]} vs ids {want[:16]}"
    )


def expect_tensor_matches_meta(tensor: LoadedTensor, meta: SavepointMeta) -> None:
    if list(tensor.shape) != meta.shape:
        raise AssertionError(f"`{meta.name}`: the stored tensor is {list(tensor.shape)}, metadata says {meta.shape}")
    if tensor.dtype != meta.dtype:
        raise AssertionError(f"`{meta.name}`: the stored tensor is {tensor.dtype}, metadata says {meta.dtype}")


def expect_finite(tensor: LoadedTensor, name: str) -> None:
    bad = ~np.isfinite(tensor.values)
    if bad.any():
        where = np.argwhere(bad)[:3].tolist()
        raise AssertionError(
            f"`{name}` holds {int(bad.sum())} NaN/Inf values of {tensor.values.size} (first at {where})"
        )


def expect_close(a: np.ndarray, b: np.ndarray, *, what: str, rtol: float, atol: float) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ, {list(a.shape)} vs {list(b.shape)}")
    if not np.allclose(a, b, rtol=rtol, atol=atol):
        diff = np.abs(a - b)
        raise AssertionError(
            f"{what}: values differ (max abs diff {float(diff.max()):.4g} at {np.unravel_index(diff.argmax(), diff.shape)}, "
            f"rtol={rtol}, atol={atol})"
        )


def expect_different(a: np.ndarray, b: np.ndarray, *, what: str) -> None:
    if a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=1e-6):
        raise AssertionError(f"{what}: the two tensors are identical, they must differ")


def rounding_tolerance(dtype: str) -> tuple[float, float]:
    """(rtol, atol) within which two computations of the same value agree in ``dtype``."""
    name = dtype.removeprefix("torch.")
    return {"bfloat16": (2e-2, 2e-2), "float16": (2e-3, 2e-3)}.get(name, (1e-3, 1e-3))


def expected_size_mb(meta: SavepointMeta) -> float | None:
    width = itemsize(meta.dtype)
    return None if width is None else round(meta.numel * width / 2**20, 2)


def expect_client_error(answer: Answer, codes: tuple[int, ...], *, mention: str | None = None) -> None:
    """A 4xx from ``codes`` with the protocol's ``{"detail": ...}`` body and no traceback."""
    if answer.status not in codes:
        wanted = " or ".join(map(str, codes))
        raise AssertionError(f"expected {wanted}; {answer.describe()}")
    body = answer.json_object()
    if "detail" not in body:
        raise AssertionError(f"error body should be {{\"detail\": ...}}; {answer.describe()}")
    if "Traceback (most recent call last)" in answer.text:
        raise AssertionError(f"error body leaks a Python traceback; {answer.describe()}")
    if mention is not None and mention not in answer.text:
        raise AssertionError(f"error should name {mention!r}; {answer.describe()}")


@contextmanager
def watching(client: CaptureClient) -> Iterator[list[Answer]]:
    """Collect every answer the client receives inside the block."""
    seen: list[Answer] = []
    client.observers.append(seen.append)
    try:
        yield seen
    finally:
        client.observers.remove(seen.append)


def expect_all_clean(answers: list[Answer]) -> None:
    problems = [a for a in answers if a.status >= 500 or "OutOfOrderError" in a.text]
    if problems:
        raise AssertionError(
            f"{len(problems)} of {len(answers)} answers were 5xx or mentioned OutOfOrderError; first: "
            f"{problems[0].describe()}"
        )


def plausible_file_size(data: bytes, meta: SavepointMeta) -> None:
    width = itemsize(meta.dtype)
    if width is None:
        raise AssertionError(f"`{meta.name}`: unknown dtype {meta.dtype!r}")
    payload = math.prod(meta.shape) * width
    if len(data) < payload:
        raise AssertionError(
            f"`{meta.name}`: file has {len(data)} bytes, fewer than the {payload} bytes of {meta.shape} x {meta.dtype}"
        )

