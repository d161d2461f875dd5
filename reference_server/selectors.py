"""Savepoint selectors: parsed as data, resolved by walking the module tree.

A selector is a module path (``model.layers[3]``, ``transformer.h.3.mlp``,
``embed_out``), optionally ending in ``.output`` (default) or ``.input``. The
protocol alias ``logits`` names the served model's output head, whatever its
path (``get_output_embeddings()``: ``lm_head`` in most families, ``embed_out``
in GPT-NeoX): each model supplies its own alias map (``CaptureModel.aliases``).
Selectors come from clients, so they are never evaluated and never resolved
through ``getattr``: each step must name a registered child module
(``Module._modules``), which keeps ``__class__``, ``__import__('os')`` and
friends out by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .errors import Unprocessable

LOGITS = "logits"
# What ``logits`` reads as where no model is at hand (a parse on its own, for display): the
# protocol 1.0 spelling. Serving never relies on it: the service parses against the served
# model's aliases, and ``CaptureModel.site`` binds every selector to its model again.
UNBOUND_ALIASES: Mapping[str, str] = {LOGITS: "lm_head"}
_SEGMENT = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*|[0-9]+)(?P<index>(\[[0-9]+\])*)$")
_INDEX = re.compile(r"\[([0-9]+)\]")
MAX_SELECTOR_LENGTH = 256


@dataclass(frozen=True)
class Selector:
    """A parsed selector: the module path (dotted, indices as path parts) and which side."""

    text: str  # as the client wrote it
    module_path: str  # canonical dotted path, e.g. "model.layers.3"
    io: str  # "output" or "input"


def parse_selector(text: object, aliases: Mapping[str, str] | None = None) -> Selector:
    """Parse ``text``; ``aliases`` (a model's own, e.g. ``{"logits": "embed_out"}``) rename a leading alias."""
    aliases = UNBOUND_ALIASES if aliases is None else aliases
    if not isinstance(text, str) or not text:
        raise Unprocessable(f"selector must be a non-empty string, got {text!r}")
    if len(text) > MAX_SELECTOR_LENGTH:
        raise Unprocessable(f"selector longer than {MAX_SELECTOR_LENGTH} characters")
    parts = text.split(".")
    io = "output"
    if len(parts) > 1 and parts[-1] in ("output", "input"):
        io = parts.pop()
    if parts and parts[0] in aliases:
        parts = aliases[parts[0]].split(".") + parts[1:]
    path: list[str] = []
    for segment in parts:
        match = _SEGMENT.match(segment)
        if not match:
            raise Unprocessable(f"invalid selector {text!r}: bad segment {segment!r}")
        path.append(match.group("name"))
        path.extend(_INDEX.findall(match.group("index")))
    return Selector(text=text, module_path=".".join(path), io=io)
