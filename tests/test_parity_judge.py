"""Fleet parity's judgement on hand-made replays: which host disagrees, and when it cannot be told."""

from __future__ import annotations

import numpy as np

from capture_conformance.harness.protocol.parity import REFERENCE, HostCapture, HostReplay, Savepoint, judge, reference_replay

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


def test_with_the_independent_reference_voting_two_hosts_are_told_apart():
    off = HEAD + 0.05 * RNG.standard_normal(HEAD.shape).astype(np.float32)
    table = judge([host("a"), host("b", head=off), host(REFERENCE)], ["head", "block_first"])
    assert [v.url for v in table.verdicts if not v.ok] == ["b"], table.as_dict()
    assert table.note == "" and not table.ok


def test_reference_replay_reads_the_teacher_forced_rows_and_its_own_greedy_ids():
    class FakeReference:  # a stand-in for harness.protocol.reference.Reference: rows = position numbers
        layout = type("L", (), {"head": "lm_head", "block": lambda self, i, sub=None, io="output": f"b[{i}]"})()

        def site(self, selector):
            return selector

        def values(self, prompt_ids, completion_ids, sites):
            n = len(prompt_ids) + len(completion_ids)
            out = {}
            for site in sites:
                rows = np.zeros((n, 6), np.float32)
                rows[:, 0] = np.arange(n)
                if site == "lm_head":
                    rows[np.arange(n), np.arange(n) % 6] += 100  # argmax at position p is p % 6
                out[site] = rows
            return out

    prompt = [1, 2, 3]  # P = 3: generated step i is position 2 + i
    served = {"head": np.zeros((1, 2, 6), np.float32), "block_first": np.zeros((1, 2, 6), np.float32)}
    replays = [host("x"), host("y")]
    for r in replays:
        r.captures = {"short/generated": HostCapture([7, 8], dict(served), "float32", prompt)}
    points = (Savepoint("head", "{head}"), Savepoint("block_first", "{blocks}[0]"))
    voter = reference_replay(FakeReference(), replays, points)
    capture = voter.captures["short/generated"]
    assert capture.values["block_first"][0, :, 0].tolist() == [2.0, 3.0]  # positions P-1 and P
    assert capture.ids == [2, 3] and capture.values["head"].shape == (1, 2, 6)
