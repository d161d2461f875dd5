"""Comparing a served capture with the reference computation: tolerances, wrong candidates, diagnoses.

Rounding and a wrong value can look alike in absolute terms: adjacent layers of
a trained model are highly correlated, and a bf16 server is a few percent off
the fp32 truth. So each comparison measures the served tensor's relative error
(``||served - right|| / ||right||`` over all its steps) against the right value
*and* against the nearest wrong candidates (the neighbouring layers, the same
module one position earlier or later, the module's other side, the output after
the final norm, softmax of the logits, ...). It passes only when the error is
within the tolerance of the server's model dtype and the capture dtype **and**
the served tensor is clearly closer to the right value than to every wrong one.

No pytest here: the suites turn a failed ``Comparison`` into an assertion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from capture_conformance.harness.protocol.layout import Layout
from capture_conformance.harness.protocol.reference import Site

# Relative error (Frobenius, over the compared steps) allowed for the server's model dtype:
# fp32 servers differ from a full-sequence pass only by kernel and cache order (1e-6 on
# CPU, ~1e-3 with TF32 on a GPU); bf16/fp16 accumulate their rounding over the layers.
MODEL_TOLERANCE = {"float32": 2e-3, "bfloat16": 6e-2, "float16": 1.5e-2}
# Added for the rounding of the stored file's dtype (about one unit in the last place).
CAPTURE_TOLERANCE = {"float32": 0.0, "bfloat16": 8e-3, "float16": 1e-3}
UNKNOWN_MODEL_DTYPE = "bfloat16"  # the loosest, when /v1/models does not say
# The served tensor must be this many times closer to the right value than to any wrong one.
SEPARATION = 2.0


@dataclass(frozen=True)
class Tolerance:
    rel: float
    model_dtype: str
    capture_dtype: str
    source: str  # "derived from ..." or "--value-tolerance"

    def describe(self) -> str:
        return f"relative error <= {self.rel:.3g} ({self.source})"


def tolerance_for(model_dtype: str | None, capture_dtype: str, override: float | None = None) -> Tolerance:
    model = (model_dtype or "").removeprefix("torch.")
    capture = capture_dtype.removeprefix("torch.")
    if override is not None:
        return Tolerance(override, model or "unknown", capture, "--value-tolerance")
    known = model in MODEL_TOLERANCE
    base = MODEL_TOLERANCE[model if known else UNKNOWN_MODEL_DTYPE]
    rel = base + CAPTURE_TOLERANCE.get(capture, CAPTURE_TOLERANCE["bfloat16"])
    why = (f"derived from model dtype {model} and capture dtype {capture}" if known else
           f"model dtype not given by /v1/models: {UNKNOWN_MODEL_DTYPE} assumed; capture dtype {capture}")
    return Tolerance(rel, model or "unknown", capture, why)


def positions(tokens: str, prompt_len: int, steps: int, generated: int) -> list[int]:
    """Positions of the teacher-forced pass that the served steps hold (step i = ``P-1+i``)."""
    if tokens == "first":
        return [prompt_len - 1]
    if tokens == "last":
        return [prompt_len - 1 + generated - 1]
    return [prompt_len - 1 + i for i in range(steps)]


def rel_error(served: np.ndarray, right: np.ndarray) -> float:
    scale = float(np.linalg.norm(right))
    return float(np.linalg.norm(served - right)) / max(scale, 1e-30)


@dataclass
class Candidate:
    label: str  # what the served tensor would be if it matched this: "layer 2 of the reference (`model.layers[2]`)"
    values: np.ndarray
    error: float = 0.0


@dataclass
class Comparison:
    name: str
    selector: str
    tokens: str
    capture_dtype: str
    steps: int
    rel_error: float
    tolerance: float
    nearest_wrong: str
    nearest_wrong_error: float
    ok: bool
    diagnosis: str = ""
    candidates: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"`{self.name}` ({self.selector}, tokens {self.tokens}, {self.capture_dtype}): relative error "
                f"{self.rel_error:.3g} (tolerance {self.tolerance:.3g}); nearest wrong candidate: "
                f"{self.nearest_wrong} at {self.nearest_wrong_error:.3g}")

    def message(self) -> str:
        if not self.diagnosis:
            return self.summary()
        if self.rel_error == float("inf"):
            return f"`{self.name}` ({self.selector}, tokens {self.tokens}, {self.capture_dtype}) {self.diagnosis}"
        return (f"`{self.name}` ({self.selector}, tokens {self.tokens}, {self.capture_dtype}) {self.diagnosis}; "
                f"relative error {self.rel_error:.3g} to the right value (tolerance {self.tolerance:.3g}), "
                f"{self.nearest_wrong_error:.3g} to the nearest wrong candidate")

    def as_dict(self) -> dict:
        data = asdict(self)
        data["candidates"] = {k: round(v, 6) for k, v in self.candidates.items()}
        return data


def _site_label(site: Site, layout: Layout | None = None) -> str:
    where = layout.block_of(site.module_path) if layout else None
    if where and where[1] == "" and site.io == "output":
        return f"layer {where[0]} of the reference (`{site.label}`)"
    if where and layout.block_mlp and where[1] == f".{layout.block_mlp}" and site.io == "output":
        return f"the MLP of layer {where[0]} of the reference (`{site.label}`), not the block's output"
    if layout and site.module_path == layout.final_norm and site.io == "output":
        return f"`{site.label}` of the reference (the last layer after the final norm)"
    return f"`{site.label}` of the reference"


def candidate_sites(site: Site, layout: Layout, has_module: Callable[[str], bool]) -> list[Site]:
    """Other modules whose value a buggy server plausibly serves instead of ``site``'s.

    Found by the model's structure (``layout``), whatever the family calls its
    modules: the neighbouring blocks, the block around a submodule, the MLP
    instead of the block, the final norm after the last block, the other side
    of the same module.
    """
    found: list[Site] = []
    where = layout.block_of(site.module_path)
    if where:
        index, rest = where
        for other in (index - 1, index + 1):
            if 0 <= other < layout.num_blocks:
                found.append(Site(f"{layout.blocks}.{other}{rest}", site.io))
        if rest:  # a submodule: the block's own output (e.g. a capture modified by the residual add)
            found.append(Site(f"{layout.blocks}.{index}", "output"))
        elif site.io == "output":
            if layout.block_mlp:  # the MLP's output, before the residual add
                found.append(Site(f"{layout.blocks}.{index}.{layout.block_mlp}", "output"))
            if index == layout.last and layout.final_norm:
                found.append(Site(layout.final_norm, "output"))  # the last layer taken after the final norm
    found.append(Site(site.module_path, "input" if site.io == "output" else "output"))
    return [s for s in dict.fromkeys(found) if s != site and has_module(s.module_path)]


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def head_transforms(right: np.ndarray, temperature: float | None) -> list[Candidate]:
    out = [Candidate("softmax of the reference logits (probabilities)", _softmax(right)),
           Candidate("log_softmax of the reference logits (log-probabilities)",
                     right - np.log(np.exp(right - right.max(-1, keepdims=True)).sum(-1, keepdims=True))
                     - right.max(-1, keepdims=True))]
    if temperature and temperature > 0 and abs(temperature - 1.0) > 1e-6:
        out.append(Candidate(f"the reference logits divided by temperature {temperature:g} (logits after "
                             f"temperature scaling, not the raw logits)", right / temperature))
    return out


def compare(*, name: str, selector: str, tokens: str, capture_dtype: str, served: np.ndarray, site: Site,
            reference: dict[Site, np.ndarray], prompt_len: int, generated: int, tolerance: Tolerance,
            temperature: float | None = None, layout: Layout | None = None) -> Comparison:
    """``served`` is the downloaded ``[1, n, D]`` tensor; ``reference`` maps sites to ``[P+N, D]`` values.

    ``layout`` (the reference model's roles) names the candidates and tells the head's output, whose
    probability and temperature transforms are candidates too.
    """
    head = layout is not None and site.module_path == layout.head and site.io == "output"
    served = np.asarray(served, dtype=np.float32)
    full = reference[site]
    total = full.shape[0]
    if served.ndim != 3 or served.shape[0] != 1:
        return Comparison(name, selector, tokens, capture_dtype, 0, float("inf"), tolerance.rel, "-", float("inf"),
                          False, f"is {list(served.shape)}, not [1, steps, D]: nothing to compare position by position")
    served = served[0]
    steps = served.shape[0]
    where = positions(tokens, prompt_len, steps, generated)
    if not where or max(where) >= total or min(where) < 0:
        return Comparison(name, selector, tokens, capture_dtype, steps, float("inf"), tolerance.rel, "-",
                          float("inf"), False, f"has {steps} steps for {generated} completion ids (tokens "
                                                  f"{tokens!r}): they cannot all be positions of prompt + completion")
    right = full[where]
    if right.shape != served.shape:
        return Comparison(name, selector, tokens, capture_dtype, steps, float("inf"), tolerance.rel, "-",
                          float("inf"), False, f"served {list(served.shape)} but the reference has "
                                               f"{list(right.shape)} at positions {where[:4]}...")
    err = rel_error(served, right)
    candidates: list[Candidate] = []
    for shift, word, at in ((-1, "earlier", "P-2+i"), (1, "later", "P+i")):
        moved = [p + shift for p in where]
        if all(0 <= p < total for p in moved):
            candidates.append(Candidate(f"the same module one position {word} (step i at {at})", full[moved]))
    for other in reference:
        if other != site:
            candidates.append(Candidate(_site_label(other, layout), reference[other][where]))
    if head:
        candidates.extend(head_transforms(right, temperature))
    candidates = [c for c in candidates if c.values.shape == served.shape]  # another width is no candidate
    for c in candidates:
        c.error = rel_error(served, c.values)
    nearest = min(candidates, key=lambda c: c.error) if candidates else Candidate("none", right, float("inf"))
    ok = err <= tolerance.rel and nearest.error >= SEPARATION * err
    comparison = Comparison(name, selector, tokens, capture_dtype, steps, err, tolerance.rel, nearest.label,
                            nearest.error, ok, candidates={c.label: c.error for c in candidates})
    if not ok:
        comparison.diagnosis = diagnose(served, right, full, where, err, tolerance, nearest, prompt_len, head=head)
    return comparison


def diagnose(served: np.ndarray, right: np.ndarray, full: np.ndarray, where: list[int], err: float,
             tolerance: Tolerance, nearest: Candidate, prompt_len: int, *, head: bool = False) -> str:
    """What the served value looks like instead, when it can be told (``head``: the value is the head's output)."""
    if head and served.size:
        sums = served.astype(np.float64).sum(axis=-1)
        if (served >= 0).all() and np.allclose(sums, 1.0, atol=1e-2):
            return "rows sum to 1 and are non-negative: probabilities (softmax), not logits"
    if err <= tolerance.rel:
        if nearest.error < err:
            return (f"is within the tolerance but closer to {nearest.label} ({nearest.error:.3g}) than to the right "
                    f"value: it looks like {nearest.label}")
        return (f"is within the tolerance, but {nearest.label} is nearly as close ({nearest.error:.3g}): the "
                f"comparison cannot tell the right value from a wrong one; tighten --value-tolerance or check "
                f"the server's dtype")
    if nearest.error <= tolerance.rel or (err > tolerance.rel and nearest.error < err / SEPARATION):
        return f"matches {nearest.label} (relative error {nearest.error:.3g})"
    per_step = [rel_error(served[i], right[i]) for i in range(len(where))]
    bad = [i for i, e in enumerate(per_step) if e > tolerance.rel]
    if len(where) == 1:
        best = min(range(full.shape[0]), key=lambda p: rel_error(served[0], full[p]))
        best_err = rel_error(served[0], full[best])
        if best_err <= tolerance.rel and best != where[0]:
            return (f"the captured step does not match position {_pos(where[0], prompt_len)} of the reference; "
                    f"it matches position {_pos(best, prompt_len)} (error {best_err:.3g})")
    elif bad and len(bad) < len(where):
        notes = []
        for i in bad[:3]:
            best = min(range(full.shape[0]), key=lambda p: rel_error(served[i], full[p]))
            best_err = rel_error(served[i], full[best])
            step_name = f"step {i}"
            expected = f"P-1+{i}" if i else "P-1"
            if best_err <= tolerance.rel:
                notes.append(f"{step_name} does not match position {expected} of the reference; it matches "
                             f"position {_pos(best, prompt_len)} (error {best_err:.3g})")
            else:
                notes.append(f"{step_name} does not match position {expected} of the reference "
                             f"(error {per_step[i]:.3g}) nor any other position")
        return "; ".join(notes) + f"; the other steps match (errors <= {tolerance.rel:.3g})"
    return ("matches no candidate: every step is off by about the same amount, as from different weights "
            "(another checkpoint of the same architecture?) or a different computation")


def _pos(position: int, prompt_len: int) -> str:
    """A position of the teacher-forced pass relative to the prompt length: ``P-2``, ``P+3``."""
    offset = position - prompt_len
    return "P" if offset == 0 else f"P{offset:+d}"
