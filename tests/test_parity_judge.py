"""Fleet parity's judgement on hand-made replays: which host disagrees, and when it cannot be told."""

from __future__ import annotations

import numpy as np

from capture_conformance.harness.protocol.parity import HostCapture, HostReplay, judge

RNG = np.random.default_rng(3)
HEAD = RNG.standard_normal((1, 4, 32)).astype(np.float32)
BLOCK = RNG.standard_normal((1, 4, 8)).astype(np.float32)
IDS = [5, 6, 7, 8]


def host(url: str, *, head=HEAD, block=BLOCK, ids=IDS, dtype="float32", error=None) -> HostReplay:
    replay = HostReplay(url, error=error)
    if error is None:
        replay.captures["short/generated"] = HostCapture(list(ids), {"head": head, "block_first": block}, dtype)
    return replay


def test_three_hosts_name_the_one_that_is_off():
    off = HEAD + 0.05 * RNG.standard_normal(HEAD.shape).astype(np.float32)  # ~5% relative: a wrong checkpoint
    table = judge([host("a"), host("b"), host("c", head=off)], ["head", "block_first"])
    assert [v.url for v in table.verdicts if not v.ok] == ["c"], table.as_dict()
    bad = table.verdict("c")
    assert "c disagrees with" in bad.why and "short/generated head" in bad.why and bad.deviation > 0.01
    assert table.verdict("a").deviation == 0.0 and table.note == ""


def test_rounding_within_two_hosts_tolerance_is_parity():
    # bf16-like noise on a bfloat16 host: within the pair's summed tolerance
    jitter = HEAD * (1 + 1e-3 * RNG.standard_normal(HEAD.shape).astype(np.float32))
    table = judge([host("a", dtype="bfloat16"), host("b", head=jitter, dtype="bfloat16")], ["head"])
    assert table.ok, table.as_dict()


def test_two_hosts_that_disagree_are_both_flagged_with_the_reason_it_cannot_be_pinned():
    table = judge([host("a"), host("b", block=BLOCK * 1.2)], ["head", "block_first"])
    assert not table.ok and {v.url for v in table.verdicts if not v.ok} == {"a", "b"}
    assert "cannot tell which" in table.note


def test_different_greedy_ids_fail_and_are_shown():
    other_ids = [5, 6, 9, 9]
    table = judge([host("a"), host("b"), host("c", ids=other_ids)], ["head"])
    assert [v.url for v in table.verdicts if not v.ok] == ["c"]
    assert "greedy ids differ from step 2" in table.verdict("c").why


def test_a_shard_instead_of_the_whole_is_a_shape_disagreement():
    table = judge([host("a"), host("b"), host("c", head=HEAD[..., :16])], ["head"])
    assert [v.url for v in table.verdicts if not v.ok] == ["c"]
    assert "shape [1, 4, 16] vs [1, 4, 32]" in table.verdict("c").why or "shape [1, 4, 32] vs [1, 4, 16]" in table.verdict("c").why


def test_a_host_whose_replay_failed_is_not_in_parity():
    table = judge([host("a"), host("b"), host("c", error="ServerFault: 500")], ["head"])
    assert [v.url for v in table.verdicts if not v.ok] == ["c"] and "replay failed" in table.verdict("c").why
    assert table.verdict("a").ok and table.verdict("b").ok
