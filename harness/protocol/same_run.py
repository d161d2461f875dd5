"""Two captures of the same request that must hold the same values: streamed and unstreamed, batched and solo.

No reference model is needed: the server is compared with itself. Two runs of one
greedy request differ at most by the rounding of the capture dtype (another kernel
order, another batch row), or not at all where the server claims bitwise batch
invariance. When they differ, the message says which steps differ and what those
steps hold instead (another step of the same run, the previous positions shifted
in, zeros), since that names the bug: the last step repeated, padding left in.

No pytest here: the suites turn a non-empty diagnosis into an assertion.
"""

from __future__ import annotations

import numpy as np


def _close(a: np.ndarray, b: np.ndarray, rtol: float, atol: float, bitwise: bool) -> bool:
    if a.shape != b.shape:
        return False
    if bitwise:
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))


def difference(got: np.ndarray, want: np.ndarray, *, rtol: float, atol: float, bitwise: bool = False) -> str | None:
    """None when ``got`` equals ``want`` (``[1, steps, D]`` each); else what differs, in words.

    ``bitwise``: equal bit for bit (the server claims batch invariance); otherwise
    within ``rtol``/``atol``, the rounding of the capture dtype.
    """
    if got.shape != want.shape:
        return f"shape {list(got.shape)} where the other run has {list(want.shape)}"
    if _close(got, want, rtol, atol, bitwise):
        return None
    if got.ndim != 3 or got.shape[0] != 1:
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        return f"values differ (max abs diff {float(np.nanmax(diff)):.4g})"
    g, w = got[0], want[0]
    steps = g.shape[0]
    bad = [i for i in range(steps) if not _close(g[i], w[i], rtol, atol, bitwise)]
    diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
    how = "bit for bit" if bitwise else f"rtol={rtol:g}, atol={atol:g}"
    head = (f"steps {bad[:8]}{' ...' if len(bad) > 8 else ''} of {steps} differ ({how}; max abs diff "
            f"{float(np.nanmax(diff)):.4g})")
    holds = {}
    for i in bad:
        if not np.any(g[i]):
            holds[i] = "zeros"
            continue
        match = next((j for j in range(steps) if j != i and _close(g[i], w[j], rtol, atol, bitwise)), None)
        if match is not None:
            holds[i] = match
    notes = []
    shifts = {i - j for i, j in holds.items() if isinstance(j, int)}
    if len(bad) > 1 and len(holds) == len(bad) and len(set(holds.values())) == 1 and isinstance(holds[bad[0]], int):
        notes.append(f"every differing step holds step {holds[bad[0]]} of the other run (one step repeated)")
    elif holds and len(shifts) == 1 and all(isinstance(j, int) or j == "zeros" for j in holds.values()):
        (shift,) = shifts
        zeros = [i for i, j in holds.items() if j == "zeros"]
        notes.append(f"the steps are shifted by {shift} position(s)"
                     + (f", with zeros at steps {zeros[:8]} (padding left in?)" if zeros else ""))
    else:
        for i in bad[:3]:
            if i in holds:
                notes.append(f"step {i} holds " + ("zeros" if holds[i] == "zeros" else f"step {holds[i]} of the other run"))
    return head + (": " + "; ".join(notes) if notes else "")
