"""Validating views of the server's JSON answers.

Every accessor checks the field it reads and fails with a ``ServerFault`` that
says which field was missing or malformed and what the server sent instead, so
the suites can write ``completion.usage.completion_tokens`` without guarding
against ``KeyError`` on a server that answers something else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from capture_conformance.harness.protocol.client import ServerFault, excerpt


def _brief(body: Any) -> str:
    return excerpt(json.dumps(body, default=str), 300)


def field(body: Any, path: str, kind: type | tuple[type, ...] | None = None, *, where: str = "response") -> Any:
    """``body`` at the dotted ``path`` (``choices.0.message``), checked against ``kind``."""
    node = body
    walked: list[str] = []
    for part in path.split("."):
        walked.append(part)
        if isinstance(node, list) and part.isdigit():
            if int(part) >= len(node):
                raise ServerFault(f"{where} has no {'.'.join(walked)} (list of {len(node)}): {_brief(body)}")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                raise ServerFault(f"{where} has no {'.'.join(walked)!r}: {_brief(body)}")
            node = node[part]
        else:
            raise ServerFault(f"{where}: {'.'.join(walked[:-1]) or 'body'} is a {type(node).__name__}, not an object: {_brief(body)}")
    if kind is not None:
        # bool is an int in Python; a count that is True is still malformed.
        bad_bool = isinstance(node, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
        if bad_bool or not isinstance(node, kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ServerFault(f"{where}: {path} should be {names}, got {node!r}")
    return node


@dataclass
class SavepointMeta:
    """One entry of ``activations_meta``."""

    name: str
    raw: dict

    def _get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        return field(self.raw, key, kind, where=f"activations_meta[{self.name!r}]")

    @property
    def shape(self) -> list[int]:
        shape = self._get("shape", list)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ServerFault(f"activations_meta[{self.name!r}].shape is not a list of sizes: {shape!r}")
        return shape

    @property
    def dtype(self) -> str:
        return self._get("dtype", str)

    @property
    def numel(self) -> int:
        return self._get("numel", int)

    @property
    def size_mb(self) -> float:
        return float(self._get("size_mb", (int, float)))

    @property
    def file_path(self) -> str:
        return self._get("file_path", str)

    @property
    def url(self) -> str:
        return self._get("url", str)

    @property
    def selector(self) -> str:
        return self._get("selector", str)

    @property
    def tokens(self) -> str:
        return self._get("tokens", str)

    @property
    def format(self) -> str:
        return self._get("format", str)

    @property
    def advertised_numel(self) -> int:
        """The largest element count the metadata admits to (for the download cap)."""
        counts = [math.prod(self.shape)]
        if isinstance(self.raw.get("numel"), int):
            counts.append(self.raw["numel"])
        return max(counts)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class Completion:
    """A 200 answer of ``/v1/chat/completions``."""

    body: dict
    request: dict
    # The model's tokenizer when the harness has one: lets a usage check say what usage counted instead.
    tokenizer: Any = None
    dialect: str = "protocol-v1"

    def _v1_field(self, name: str, kind: type) -> Any:
        """A protocol-v1 field: a defect when a v1 server lacks it, "missing" for another dialect."""
        if name not in self.body and self.dialect != "protocol-v1":
            from capture_conformance.harness.protocol.missing import missing

            missing(f"'{name}' in chat responses", self.dialect)
        return field(self.body, name, kind)

    @property
    def choice(self) -> dict:
        choices = field(self.body, "choices", list)
        if len(choices) != 1:
            raise ServerFault(f"chat response should have exactly one choice (n=1), has {len(choices)}")
        return field(self.body, "choices.0", dict)

    @property
    def content(self) -> str:
        return field(self.body, "choices.0.message.content", str)

    @property
    def finish_reason(self) -> str:
        return field(self.body, "choices.0.finish_reason", str)

    @property
    def usage(self) -> Usage:
        return Usage(
            field(self.body, "usage.prompt_tokens", int),
            field(self.body, "usage.completion_tokens", int),
            field(self.body, "usage.total_tokens", int),
        )

    @property
    def run_id(self) -> str:
        return self._v1_field("activation_run_id", str)

    @property
    def token_ids(self) -> list[int]:
        ids = self._v1_field("completion_token_ids", list)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ServerFault(f"completion_token_ids should be a list of ints: {_brief(ids)}")
        return ids

    @property
    def meta(self) -> dict[str, SavepointMeta]:
        if "activations_meta" not in self.body:
            keys = sorted(self.body)
            raise ServerFault(f"capture was requested but the response has no activations_meta (keys: {keys})")
        raw = field(self.body, "activations_meta", dict)
        for name, entry in raw.items():
            if not isinstance(entry, dict):
                raise ServerFault(f"activations_meta[{name!r}] is not an object: {entry!r}")
        return {name: SavepointMeta(name, entry) for name, entry in raw.items()}

    def savepoint(self, name: str) -> SavepointMeta:
        meta = self.meta
        if name not in meta:
            asked = self.request.get("capture", {}).get("savepoints") if isinstance(self.request.get("capture"), dict) else None
            hint = ""
            if asked and list(meta) == ["_logits"]:
                hint = " (the server ignored the `capture` object: an older-family server that only knows store_activations?)"
            raise ServerFault(
                f"savepoint {name!r} missing from activations_meta; the server answered {sorted(meta)}{hint}"
            )
        return meta[name]

    def savepoint_by_selector(self, selector: str) -> SavepointMeta:
        """The entry captured for a plain selector string (the protocol does not fix its name)."""
        meta = self.meta
        matches = [m for m in meta.values() if m.raw.get("selector") == selector]
        if not matches and selector in meta:
            return meta[selector]
        if len(matches) != 1:
            raise ServerFault(
                f"expected one activations_meta entry with selector {selector!r}; "
                f"entries: { {n: m.raw.get('selector') for n, m in meta.items()} }"
            )
        return matches[0]
