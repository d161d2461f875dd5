"""The variants measured, the ratios reported and the issue's targets: data, no torch.

Names are stable: they key the JSON, the table and ``--only``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    group: str  # "anchor" (in this process) or "server" (over HTTP)
    description: str


LATENCY_VARIANTS: list[Variant] = [
    Variant("hf-generate", "anchor",
            "plain transformers generate, greedy, called as the server calls it; no server, no nnsight"),
    Variant("hf-hooks-logits", "anchor",
            "the same generate with a forward hook on the head keeping each step's last position "
            "(cloned, float32), stacked and moved to the CPU at the end: capture done by hand"),
    Variant("nnsight-logits", "anchor",
            "nnsight generate in this process, one invoke, per-step loop saving the head's last position "
            "(cloned, float32), stacked and moved to the CPU: nnsight's own cost, no HTTP, no files"),
    Variant("server-none", "server", "reference server, chat request without capture"),
    Variant("server-logits-pt", "server", "reference server, all-token _logits (the model's head), float32, .pt"),
    Variant("server-logits-safetensors", "server", "reference server, all-token _logits, float32, safetensors"),
    Variant("server-logits-layers", "server",
            "reference server, all-token _logits plus every decoder block's output (discovered), .pt"),
    Variant("server-logits-last", "server", "reference server, _logits with tokens: \"last\" (one step kept), .pt"),
    Variant("server-prompt-logits", "server",
            "reference server, _logits at every prompt position (positions: \"prompt\", [1, P, V]), .pt"),
    Variant("server-sequence-logits", "server",
            "reference server, _logits at every prompt and completion position (positions: \"sequence\", "
            "[1, P+N, V]: one more forward step), .pt"),
]

VARIANT_NAMES = [v.name for v in LATENCY_VARIANTS]


def concurrency_name(k: int) -> str:
    return f"server-k{k}"


@dataclass(frozen=True)
class RatioSpec:
    name: str
    numerator: str
    denominator: str
    meaning: str


RATIOS: list[RatioSpec] = [
    RatioSpec("capture/no-capture (pt)", "server-logits-pt", "server-none", "what all-token _logits capture adds to a server request"),
    RatioSpec("capture/no-capture (safetensors)", "server-logits-safetensors", "server-none", "the same, safetensors files"),
    RatioSpec("layers/no-capture", "server-logits-layers", "server-none", "_logits plus every decoder layer"),
    RatioSpec("last/no-capture", "server-logits-last", "server-none", "tokens: last"),
    RatioSpec("prompt/generated", "server-prompt-logits", "server-logits-pt",
              "prompt positions' _logits against the generated steps' (same request)"),
    RatioSpec("sequence/generated", "server-sequence-logits", "server-logits-pt",
              "whole-sequence _logits against the generated steps' (same request)"),
    RatioSpec("capture/plain generate", "server-logits-pt", "hf-generate", "a capture request against plain transformers"),
    RatioSpec("server no-capture/plain generate", "server-none", "hf-generate", "the server's own overhead (HTTP, chat template, JSON)"),
    RatioSpec("hooks/plain generate", "hf-hooks-logits", "hf-generate", "capture by hand with a forward hook"),
    RatioSpec("nnsight/plain generate", "nnsight-logits", "hf-generate", "nnsight's per-step capture in process"),
    RatioSpec("capture server/nnsight", "server-logits-pt", "nnsight-logits", "what the server adds around nnsight (HTTP, storage)"),
]


@dataclass(frozen=True)
class Target:
    key: str
    text: str
    kind: str  # "ratio" (value <= limit), "throughput" (value >= limit), "bool", "soak"
    limits: dict  # device ("cpu"/"cuda") -> limit; a device missing from the map has no target


TARGETS: list[Target] = [
    Target("capture/no-capture (pt)", "all-token _logits capture request / same request without capture", "ratio",
           {"cpu": 1.10, "cuda": 1.10}),
    Target("capture/plain generate", "capture request / plain transformers generate of the same tokens", "ratio",
           {"cuda": 1.20}),
    Target("k8/k1 throughput", "K = 8 concurrent greedy capture requests: throughput / K = 1", "throughput",
           {"cpu": 1.5, "cuda": 3.0}),
    Target("concurrent == solo", "concurrent results identical to solo runs (greedy ids)", "bool",
           {"cpu": True, "cuda": True}),
    Target("soak rss flat", "peak resident memory does not grow over the soak requests", "soak",
           {"cpu": True, "cuda": True}),
]


def select(names: list[str], patterns: list[str] | None) -> list[str]:
    """Names matching any of ``patterns`` (shell globs); all of them when no pattern is given."""
    if not patterns:
        return list(names)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def parse_int_list(text: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``; sorted, unique, each at least 1."""
    values = sorted({int(part) for part in text.split(",") if part.strip()})
    if not values or values[0] < 1:
        raise ValueError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def round_robin(items: list, rep: int) -> list:
    """``items`` rotated by ``rep``: each repetition starts one variant later, so none always runs first."""
    if not items:
        return []
    k = rep % len(items)
    return items[k:] + items[:k]
