"""Failures grouped by root cause, most basic first: the two things to fix, not sixty lines.

A cause is recognised from the failure message (the checks word each known
defect the same way everywhere: "single-token capture only: ...", "extra
dimensions: ...", "usage counts a re-tokenisation of the reply: ..."); a
message that names no known defect is its own cause (its first line, with the
numbers that vary from test to test blanked). A setup error counts under the
cause of the failure that made the setup fail, so one broken capture in a
session fixture is one cause, not a hundred errors. Skips whose reason starts
with "missing from protocol v1" are a separate summary: absent features are
reported once, not as failures.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from capture_conformance.harness.protocol.missing import MISSING

# (rank: lower is more basic, pattern searched in the first line, cause)
KNOWN: list[tuple[int, str, str]] = [
    (0, r"cannot reach|got no answer within|is gone; log tail", "the server does not answer"),
    (1, r"^missing from protocol v1: (?P<feature>.+?) \(", "missing from protocol v1: {feature}"),
    (5, r"^expected 4\d\d.* answered (?P<code>5\d\d)", "a client mistake is answered {code}, not 4xx"),
    (7, r"^expected 4\d\d; (?P<what>\S+ \S+) answered 2\d\d", "a client mistake is answered 2xx by {what}"),
    (6, r"(?P<what>(?:POST|GET|DELETE) /\S+) answered (?P<code>5\d\d)", "{what} answers {code} (a server error)"),
    (10, r"has no activations_meta", "capture asked for, but no activations_meta in the response"),
    (11, r"^extra dimensions", "extra dimensions: the capture has a size-1 dimension too many"),
    (12, r"^wrong number of dimensions", "wrong number of dimensions in the capture"),
    (13, r"^single-token capture only", "single-token capture only"),
    (13, r"^prompt-only capture", "prompt-only capture: no generated position captured"),
    (14, r"^truncated last dimension", "truncated last dimension (features cut)"),
    (14, r"^metadata and file disagree: .*the file's last dimension is truncated",
     "truncated file: the stored tensor keeps fewer features than its metadata says"),
    (15, r"^metadata and file disagree", "metadata and file disagree"),
    (16, r"savepoint .* missing from activations_meta", "requested savepoints are not captured"),
    (20, r"usage counts nothing|usage\.prompt_tokens is 0\b", "usage counts nothing (zeros)"),
    (21, r"usage counts a re-tokenisation", "usage counts a re-tokenisation of the reply"),
    (22, r"usage\.completion_tokens is \d+ but completion_token_ids has", "usage disagrees with the generated ids"),
    (30, r"greedy argmax of .* differs", "captured logits do not produce the generated ids"),
    (31, r"^batched capture differs from its solo run", "batch invariance broken: a capture depends on the requests "
                                                         "batched with it"),
    (32, r"^prompt capture shortened or changed when the same prompt is sent again",
     "a repeated prompt's capture is shortened or changed (a prefix cache?)"),
    (34, r"^streamed capture differs from the unstreamed run", "streamed captures differ from the same request "
                                                                "unstreamed"),
    (35, r"the stream is not token by token", "one-chunk streaming: the stream is not token by token"),
    (40, r"no shape snapshot for model", "no shape snapshot set (CI run)"),
    (41, r"differs from its snapshot", "capture metadata differs from its snapshot"),
]
SETUP_PREFIX = re.compile(r"^error in (setup|teardown): ")


def classify(message: str) -> tuple[int, str]:
    """(rank, cause) of one failure message."""
    text = SETUP_PREFIX.sub("", message or "").strip()
    first = text.splitlines()[0] if text else "(no message)"
    for rank, pattern, cause in KNOWN:
        match = re.search(pattern, first)
        if match:
            return rank, cause.format(**match.groupdict())
    generic = re.sub(r"\b[0-9a-f]{12,}\b", "…", first)  # run ids and hashes vary from test to test
    generic = re.sub(r"\d+", "#", generic)
    return 100, generic[:160]


def group(results: Iterable[Any], area_order: list[str]) -> list[dict[str, Any]]:
    """Causes of the failed and errored results, most basic first (rank, then the area it first shows in)."""
    causes: dict[str, dict[str, Any]] = {}
    for result in results:
        if result.outcome not in ("failed", "error"):
            continue
        rank, cause = classify(result.message)
        if rank == 100 and result.area == "health":
            rank = 2  # whatever is wrong with /health comes before everything that needs a healthy server
        entry = causes.setdefault(cause, {"cause": cause, "rank": rank, "count": 0, "areas": [], "tests": [],
                                          "example": result.message.splitlines()[0] if result.message else ""})
        entry["count"] += 1
        if result.area not in entry["areas"]:
            entry["areas"].append(result.area)
        entry["tests"].append(result.nodeid.split("::", 1)[-1])

    def basic(entry: dict) -> tuple:
        first_area = min((area_order.index(a) if a in area_order else len(area_order)) for a in entry["areas"])
        return entry["rank"], first_area, -entry["count"]

    return sorted(causes.values(), key=basic)


def missing_features(results: Iterable[Any]) -> list[dict[str, Any]]:
    """Skips of the form "missing from protocol v1: FEATURE (why)", one entry per feature."""
    out: dict[str, dict[str, Any]] = {}
    for result in results:
        if result.outcome != "skipped" or not (result.message or "").startswith(MISSING):
            continue
        rest = result.message[len(MISSING):].lstrip(": ")
        feature, _, why = rest.partition(" (")
        entry = out.setdefault(feature, {"feature": feature, "why": why.rstrip(")"), "tests": 0})
        entry["tests"] += 1
    return list(out.values())
