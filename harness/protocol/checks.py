"""Assertions the suites share, each with a message that says what the server answered."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from capture_conformance.harness.protocol.client import Answer, CaptureClient
from capture_conformance.harness.protocol.ground_truth import GroundTruth
from capture_conformance.harness.protocol.responses import Completion, SavepointMeta
from capture_conformance.harness.protocol.tensors import LoadedTensor, itemsize


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


def shape_diagnosis(shape: list[int], expected: list[int], truth: GroundTruth, *, steps: int | None,
                    tokens: str = "all") -> str | None:
    """Plain words for the shape mistakes servers actually make, or None when it is none of them."""
    got, want = symbolic(shape, truth), symbolic(expected, truth)
    if len(shape) != len(expected):
        squeezed_got = [d for d in shape if d != 1]
        squeezed_want = [d for d in expected if d != 1]
        if len(shape) > len(expected) and squeezed_got == squeezed_want:
            return (f"extra dimensions: {got} has {len(shape)} dimensions where the protocol has {len(expected)} "
                    f"{want}; a size-1 dimension was kept (stacked per-step [1,1,D] tensors without squeezing?)")
        return f"wrong number of dimensions: {got} has {len(shape)}, the protocol's {want} has {len(expected)}"
    if (len(shape) == 3 and shape[1] == 1 and expected[1] > 1 and shape[2] == expected[2] and tokens == "all"):
        return f"single-token capture only: {got} for {steps} generated tokens; expected {want} = {expected}"
    if shape[:-1] == expected[:-1] and shape[-1] < expected[-1]:
        return (f"truncated last dimension: {got} keeps {shape[-1]} of the {expected[-1]} features "
                f"of {want} (sampled or cut features?)")
    return None


def expect_shape(meta: SavepointMeta, expected: list[int], truth: GroundTruth, *, steps: int, context: str) -> None:
    shape = meta.shape
    if shape == expected:
        return
    named = shape_diagnosis(shape, expected, truth, steps=steps, tokens=meta.raw.get("tokens", "all"))
    if named and named.startswith("single-token capture only"):
        raise AssertionError(
            f"single-token capture only: `{meta.name}` is {symbolic(shape, truth)} for {steps} generated tokens "
            f"({context}); expected {symbolic(expected, truth)} = {expected}"
        )
    if named:
        head, _, rest = named.partition(": ")
        raise AssertionError(f"{head}: `{meta.name}` {rest} ({context}, {steps} generated tokens; metadata shape {shape})")
    raise AssertionError(
        f"`{meta.name}` has shape {shape} = {symbolic(shape, truth)}, expected {expected} = "
        f"{symbolic(expected, truth)} ({context}, {steps} generated tokens)"
    )


def generated_count(completion: Completion) -> int:
    """N as best the response tells it: the ids when there are any, else ``usage.completion_tokens``.

    Shape checks use it before the id checks run, so a capture that is wrong in shape is named
    as such, not as a bookkeeping mismatch of ids and usage.
    """
    ids = completion.body.get("completion_token_ids")
    if isinstance(ids, list) and ids:
        return len(ids)
    return completion.usage.completion_tokens


def usage_diagnosis(usage_count: int, ids: list[int] | None, content: str, tokenizer=None) -> str:
    """What is measurably wrong when ``usage.completion_tokens`` disagrees with the ids."""
    if usage_count == 0 and (ids or content):
        return f"usage counts nothing: usage.completion_tokens is 0 for {len(ids) if ids else 'a non-empty'} reply"
    if tokenizer is not None and content:
        retokenised = len(tokenizer(content, add_special_tokens=False)["input_ids"])
        if retokenised == usage_count and (ids is None or retokenised != len(ids)):
            return (f"usage counts a re-tokenisation of the reply: usage.completion_tokens is {usage_count}, the "
                    f"length of the reply text tokenised again, not the {len(ids) if ids else '?'} generated ids")
    return (f"usage.completion_tokens is {usage_count} but completion_token_ids has {len(ids or [])} ids: "
            f"{(ids or [])[:16]}")


def expect_token_counts(completion: Completion, *, expected_steps: int | None = None, tokenizer=None) -> int:
    """``usage.completion_tokens == len(completion_token_ids)`` (== ``expected_steps``); returns N."""
    usage = completion.usage
    ids = completion.token_ids
    if expected_steps is not None and len(ids) != expected_steps:
        raise AssertionError(
            f"expected {expected_steps} generated tokens (max_tokens={completion.request.get('max_tokens')} on a "
            f"prompt that writes on), got {len(ids)} (finish_reason={completion.finish_reason!r}): {ids}"
        )
    if usage.completion_tokens != len(ids):
        raise AssertionError(usage_diagnosis(usage.completion_tokens, ids, completion.content,
                                             tokenizer if tokenizer is not None else completion.tokenizer))
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
    held = list(tensor.shape)
    if held != meta.shape:
        detail = ""
        if len(held) == len(meta.shape) and held[:-1] == meta.shape[:-1] and held[-1] < meta.shape[-1]:
            detail = f"; the file's last dimension is truncated to {held[-1]} of {meta.shape[-1]}"
        raise AssertionError(f"metadata and file disagree: `{meta.name}`: the stored tensor is {held}, metadata "
                             f"says {meta.shape}{detail}")
    if tensor.dtype != meta.dtype:
        raise AssertionError(f"metadata and file disagree: `{meta.name}`: the stored tensor is {tensor.dtype}, "
                             f"metadata says {meta.dtype}")


def expect_finite(tensor: LoadedTensor, name: str) -> None:
    bad = ~np.isfinite(tensor.values)
    if bad.any():
        where = np.argwhere(bad)[:3].tolist()
        raise AssertionError(
            f"`{name}` holds {int(bad.sum())} NaN/Inf values of {tensor.values.size} (first at {where})"
        )


# Below this many nonzero values a tensor may round-trip through a smaller float by chance (zeros always do).
PRECISION_MIN_NONZERO = 64
# The lower precisions a float32 capture may not be limited to, unless the model itself computes in them.
LOWER_PRECISIONS = ("float16", "bfloat16")


def holds_only(values: np.ndarray, precision: str) -> bool:
    """Whether every value of a float32 array is exactly representable in ``precision`` (float16 or bfloat16)."""
    finite = values[np.isfinite(values)].astype(np.float32, copy=False)
    if precision == "bfloat16":  # bfloat16 is float32's upper 16 bits: the lower ones are all zero
        return bool(np.all((finite.view(np.uint32) & 0xFFFF) == 0))
    with np.errstate(over="ignore"):
        return bool(np.array_equal(finite.astype(np.float16).astype(np.float32), finite))


def expect_declared_precision(tensor: LoadedTensor, name: str, model_dtype: str) -> None:
    """A float32 capture holds float32 values: not values rounded through float16 or bfloat16.

    Exact, no tolerance: a random float32 value is representable in float16 with odds of
    about 2^-13, so a whole tensor of them never is unless it was rounded. A model that
    computes in bfloat16 or float16 (``model_dtype``) explains such values; the caller
    checks only float32 models.
    """
    if tensor.dtype != "torch.float32" or np.count_nonzero(tensor.values) < PRECISION_MIN_NONZERO:
        return
    for precision in LOWER_PRECISIONS:
        if holds_only(tensor.values, precision):
            raise AssertionError(
                f"`{name}`: float32 capture holds {precision} values: all {tensor.values.size} values round-trip "
                f"exactly through {precision}, although the model computes in {model_dtype}; the capture was "
                f"rounded to a lower precision before storing")


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

