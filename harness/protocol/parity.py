"""Fleet parity: the same greedy requests replayed on every host, each host's deviation from the others.

A fleet (several servers of one model, perhaps of different layouts: one
process, tensor-parallel ranks, another stack) should answer a greedy request
with the same token ids and the same captured values, within the rounding of
the model's dtype. Nothing else certifies that activations collected across
the fleet can be pooled: a shard returned instead of the gathered whole, a
rank seeded differently or another checkpoint on one host all keep every
single-host check of shapes green.

The measure is the values area's (``values.rel_error``: ``||a - b|| / ||b||``
over the compared steps) and so are the tolerances: two correct hosts may each
be off the truth by their own dtype's tolerance, so a pair is allowed the sum.
Which host disagrees: each host's deviation is the lower median of its
distances to the other hosts. With three hosts or more, a host that is wrong alone stands
out; with two, a disagreement cannot be pinned on one of them, and the result
says so (each host's own values area judges it against an independent forward
pass, where the model is local).

No pytest here: ``suites/test_parity.py`` turns a ``ParityTable`` into assertions.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from capture_conformance.harness.protocol.layout import Layout
from capture_conformance.harness.protocol.runs import CaptureRuns
from capture_conformance.harness.protocol.values import rel_error, tolerance_for

# Two prompts of different lengths; few steps: parity compares values, a handful of tokens is enough.
PROMPTS = (
    ("short", "Count: one, two,"),
    ("long", "Write one sentence about the sea, the wind and a small boat that sails at dawn."),
)
STEPS = 4
CAPTURE_DTYPE = "float32"  # the finest: rounding of the file never hides a disagreement


@dataclass(frozen=True)
class Savepoint:
    name: str
    role: str  # "{head}", "{blocks}[0]": the same savepoint on every host, whatever its module names

    def selector(self, layout: Layout) -> str:
        if self.role == "{head}":
            return layout.head
        if self.role == "{embeddings}":
            return str(layout.embeddings)
        index, _, rest = self.role.removeprefix("{blocks}[").partition("]")
        return layout.block(int(index)) + rest


def savepoints_for(num_blocks: int, embeddings: bool = True) -> tuple[Savepoint, ...]:
    """The head, the first and last block, the input of the middle one (a block input is another kind) and the
    embeddings where every host's layout names them (vocabulary-parallel on a sharded server: a classic piece
    that must be gathered whole)."""
    last, middle = num_blocks - 1, num_blocks // 2
    points = [Savepoint("head", "{head}"), Savepoint("block_first", "{blocks}[0]")]
    if last > 0:
        points.append(Savepoint("block_last", f"{{blocks}}[{last}]"))
    points.append(Savepoint("block_mid_input", f"{{blocks}}[{middle}].input"))
    if embeddings:
        points.append(Savepoint("embeddings", "{embeddings}"))
    return tuple(points)


@dataclass(frozen=True)
class Case:
    """One replayed request: a prompt and where its captures are taken (generated tokens, or the prompt)."""

    prompt_name: str
    prompt: str
    positions: str  # "generated" (the protocol's default) or "prompt"

    @property
    def name(self) -> str:
        return f"{self.prompt_name}/{self.positions}"


def cases(with_prompt_positions: bool) -> tuple[Case, ...]:
    modes = ("generated", "prompt") if with_prompt_positions else ("generated",)
    return tuple(Case(name, text, mode) for name, text in PROMPTS for mode in modes)


@dataclass
class HostCapture:
    """What one host answered to one case: its ids and each savepoint's values (float32 numpy)."""

    ids: list[int]
    values: dict[str, np.ndarray]
    model_dtype: str | None = None
    prompt_ids: list[int] | None = None  # the server's prompt_token_ids, where it gives them


@dataclass
class HostReplay:
    url: str
    captures: dict[str, HostCapture] = field(default_factory=dict)  # case name -> capture
    error: str | None = None  # the replay failed on this host (its own suites say why in detail)


def replay(url: str, runs: CaptureRuns, layout: Layout, replay_cases: tuple[Case, ...],
           model_dtype: str | None, points: tuple[Savepoint, ...]) -> HostReplay:
    """Send every case to one host, greedy, and download each savepoint."""
    result = HostReplay(url)
    try:
        for case in replay_cases:
            capture = {"savepoints": [{"name": p.name, "selector": p.selector(layout)} for p in points],
                       "dtype": CAPTURE_DTYPE, **({"positions": case.positions} if case.positions != "generated" else {})}
            completion = runs.chat(case.prompt, STEPS, capture=capture, temperature=0, cached=False)
            values = {p.name: runs.tensor(completion, p.name).values for p in points}
            given = completion.body.get("prompt_token_ids")
            prompt_ids = [int(i) for i in given] if isinstance(given, list) and given else None
            result.captures[case.name] = HostCapture(list(completion.token_ids), values, model_dtype, prompt_ids)
    except AssertionError as exc:  # ServerFault: the request or a download failed
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return result


# The independent forward pass as a voter: where the model is local, it breaks the tie of two hosts.
REFERENCE = "reference (independent forward pass)"


def reference_replay(reference, replays: list[HostReplay], points: tuple[Savepoint, ...]) -> HostReplay | None:
    """What the values area's reference model computes for the fleet's cases, as one more voter.

    Teacher-forced on the ids most hosts answered (its own greedy ids are the argmax of its
    logits there); the prompt ids are those the hosts report. None when no host gives prompt ids.
    """
    out = HostReplay(REFERENCE)
    answered = [r for r in replays if not r.error]
    for case_name in sorted({c for r in answered for c in r.captures}):
        captures = [r.captures[case_name] for r in answered if case_name in r.captures]
        majority = max(captures, key=lambda c: sum(o.ids == c.ids for o in captures))
        prompt = next((c.prompt_ids for c in captures if c.prompt_ids and c.ids == majority.ids), None)
        if prompt is None:
            return None
        sites = {p.name: reference.site(p.selector(reference.layout)) for p in points if p.name in majority.values}
        full = reference.values(prompt, majority.ids, list(sites.values()))
        start, steps = len(prompt) - 1, len(majority.ids)
        values = {}
        for name, site in sites.items():
            rows = full[site][:len(prompt)] if case_name.endswith("/prompt") else full[site][start:start + steps]
            values[name] = rows[None].astype(np.float32)
        head = full[sites["head"]] if "head" in sites else None
        ids = [int(i) for i in head[start:start + steps].argmax(axis=-1)] if head is not None else list(majority.ids)
        out.captures[case_name] = HostCapture(ids, values, "float32", prompt)
    return out


@dataclass
class PairDeviation:
    """Two hosts compared over every case: their largest relative difference and where it is."""

    a: str
    b: str
    max_rel: float  # inf when the ids or shapes do not allow a comparison
    tolerance: float
    worst: str  # "long/prompt head step 2" or why there is no comparison
    ids_agree: bool

    @property
    def ok(self) -> bool:
        return self.ids_agree and self.max_rel <= self.tolerance


def _tolerance(x: HostCapture, y: HostCapture) -> float:
    """Each host may be off the truth by its dtype's tolerance; two hosts, by the sum."""
    return (tolerance_for(x.model_dtype, CAPTURE_DTYPE).rel + tolerance_for(y.model_dtype, CAPTURE_DTYPE).rel)


def compare_pair(a: HostReplay, b: HostReplay) -> PairDeviation:
    worst, where, tolerance, ids_note = 0.0, "", 0.0, ""
    for case_name, x in a.captures.items():
        y = b.captures.get(case_name)
        if y is None:
            continue
        tolerance = max(tolerance, _tolerance(x, y))
        if x.ids != y.ids and not ids_note:
            first = next((i for i, (p, q) in enumerate(zip(x.ids, y.ids)) if p != q), min(len(x.ids), len(y.ids)))
            ids_note = f"{case_name}: greedy ids differ from step {first} ({x.ids} vs {y.ids})"
        for point, served in x.values.items():
            other = y.values.get(point)
            if other is None or served.shape != other.shape:
                return PairDeviation(a.url, b.url, float("inf"), tolerance,
                                     f"{case_name} {point}: shape {list(served.shape)} vs "
                                     f"{None if other is None else list(other.shape)}", not ids_note)
            # Only steps computed from the same tokens on both hosts are comparable.
            steps = _agreeing_steps(x.ids, y.ids, served.shape[1] if served.ndim > 1 else 1, case_name)
            err = rel_error(served[:, :steps], other[:, :steps]) if served.ndim > 1 else rel_error(served, other)
            if err > worst:
                worst, where = err, f"{case_name} {point}"
    return PairDeviation(a.url, b.url, worst, tolerance, ids_note or where, not ids_note)


def _agreeing_steps(x_ids: list[int], y_ids: list[int], steps: int, case_name: str) -> int:
    """How many leading steps were computed from the same tokens on both hosts."""
    if case_name.endswith("/prompt"):
        return steps  # prompt positions depend on the prompt only
    common = next((i for i, (p, q) in enumerate(zip(x_ids, y_ids)) if p != q), min(len(x_ids), len(y_ids)))
    return max(1, min(steps, common + 1))  # step i is computed from ids[:i]


@dataclass
class HostVerdict:
    url: str
    deviation: float  # median distance to the other hosts, in the values area's measure
    tolerance: float
    ok: bool
    why: str = ""


@dataclass
class ParityTable:
    hosts: list[str]
    cases: list[str]
    savepoints: list[str]
    pairs: list[PairDeviation]
    verdicts: list[HostVerdict]
    note: str = ""

    @property
    def ok(self) -> bool:
        """Every host agrees with the fleet (the reference, where it voted, is not a host)."""
        return all(v.ok for v in self.verdicts if v.url != REFERENCE)

    def verdict(self, url: str) -> HostVerdict:
        return next(v for v in self.verdicts if v.url == url)

    def matrix(self) -> dict[str, dict[str, float]]:
        """Host -> host -> largest relative difference."""
        out: dict[str, dict[str, float]] = {h: {} for h in self.hosts}
        for pair in self.pairs:
            out[pair.a][pair.b] = out[pair.b][pair.a] = pair.max_rel
        return out

    def as_dict(self) -> dict:
        return {"hosts": self.hosts, "cases": self.cases, "savepoints": self.savepoints,
                "measure": "relative error ||a-b||/||b|| over the steps computed from the same tokens",
                "pairs": [asdict(p) for p in self.pairs], "verdicts": [asdict(v) for v in self.verdicts],
                "matrix": self.matrix(), "note": self.note, "ok": self.ok}


def judge(replays: list[HostReplay], savepoint_names: list[str]) -> ParityTable:
    """Every pair compared; each host's deviation is the median of its distances to the others."""
    hosts = [r.url for r in replays]
    by_url = {r.url: r for r in replays}
    pairs = [compare_pair(by_url[a], by_url[b]) for i, a in enumerate(hosts) for b in hosts[i + 1:]
             if not by_url[a].error and not by_url[b].error]
    verdicts = []
    for replay_ in replays:
        if replay_.error:
            verdicts.append(HostVerdict(replay_.url, float("inf"), 0.0, False,
                                        f"the replay failed on this host: {replay_.error}"))
            continue
        mine = [p for p in pairs if replay_.url in (p.a, p.b)]
        if not mine:
            verdicts.append(HostVerdict(replay_.url, float("inf"), 0.0, False, "no other host to compare with"))
            continue
        # The lower median: a host that agrees with as many hosts as it disagrees with is not the odd one out
        # (of three, the two that agree with each other); with two hosts, a disagreement flags both.
        deviation = statistics.median_low(p.max_rel for p in mine)
        tolerance = max(p.tolerance for p in mine)
        agreeing_ids = sum(p.ids_agree for p in mine) >= len(mine) / 2 and (len(mine) > 1 or mine[0].ids_agree)
        ok = deviation <= tolerance and agreeing_ids
        why = ""
        if not ok:
            worst = max(mine, key=lambda p: (not p.ids_agree, p.max_rel))
            other = worst.b if worst.a == replay_.url else worst.a
            why = (f"{replay_.url} disagrees with {other}: " + (
                worst.worst if not worst.ids_agree else
                f"relative difference {worst.max_rel:.3g} at {worst.worst} > {worst.tolerance:.3g}"))
        verdicts.append(HostVerdict(replay_.url, deviation, tolerance, ok, why))
    note = ""
    if len(hosts) == 2 and REFERENCE not in hosts and not all(v.ok for v in verdicts):
        note = ("two hosts disagree and the harness cannot tell which is wrong: add a third host, or read each "
                "host's values area (an independent forward pass, where the model is local)")
    cases_seen = sorted({c for r in replays for c in r.captures})
    return ParityTable(hosts, cases_seen, savepoint_names, pairs, verdicts, note)


def run_parity(targets: list[tuple[str, CaptureRuns, Layout, str | None]], *, with_prompt_positions: bool,
               reference=None, on_host: Callable[[str], None] | None = None) -> ParityTable:
    """Replay the cases on every ``(url, runs, layout, model_dtype)`` and judge the fleet.

    ``reference``: the values area's ``Reference`` of the model where it is available locally;
    it then votes too (and is reported as a row of its own, never as a host).
    """
    replay_cases = cases(with_prompt_positions)
    num_blocks = min(layout.num_blocks for _, _, layout, _ in targets)
    points = savepoints_for(num_blocks, embeddings=all(layout.embeddings for _, _, layout, _ in targets))
    replays = []
    for url, runs, layout, dtype in targets:
        if on_host:
            on_host(url)
        replays.append(replay(url, runs, layout, replay_cases, dtype, points))
    voter = reference_replay(reference, replays, points) if reference is not None else None
    table = judge(replays + ([voter] if voter else []), [p.name for p in points])
    if voter is None and table.note:
        table.note += (" (no independent reference could vote: the model is not available locally, or the hosts "
                       "give no prompt_token_ids)")
    return table
