"""Stop strings a server can honour, picked from the model's own greedy output at token boundaries.

A stop string cut from whitespace-separated words assumes readable text: a
random-weight model writes runs without spaces, and a cut inside a multi-byte
character gives U+FFFD, which no server can match. So a stop string here is the
text of one or more whole generated tokens: the difference between the text of
the first k tokens and of the first k+m, where "the text of the first k tokens"
is either the model's tokenizer decoding the ids, or the server's own answer to
the same greedy request with ``max_tokens: k`` (no tokenizer needed). A pick
never contains U+FFFD, is not all whitespace, and first occurs in the full text
exactly at that boundary, so the expected content is the text before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

REPLACEMENT = "\ufffd"
MAX_TOKENS_PER_PIECE = 3


@dataclass(frozen=True)
class StopPick:
    stop: str
    expected_content: str  # the full text up to the stop string
    boundary: int  # the stop string starts with generated token number `boundary` (0-based)


def pick_stop(full_text: str, text_at: Callable[[int], str | None], steps: int, *,
              prefer_from: int = 1, max_boundary: int = 8) -> StopPick | None:
    """The first usable stop string starting at a token boundary ``k`` (``prefer_from`` ≤ k), else at 0."""
    last = min(steps - 1, max_boundary)
    for boundaries in (range(prefer_from, last + 1), range(0, min(prefer_from, last + 1))):
        for k in boundaries:
            prefix = "" if k == 0 else text_at(k)
            # (a prefix with U+FFFD is fine when the whole text has it too: a lone byte a random model emits
            # decodes so in the final text as well; startswith proves the prefix is stable)
            if prefix is None or not full_text.startswith(prefix):
                continue
            for m in range(1, MAX_TOKENS_PER_PIECE + 1):
                if k + m > steps:
                    break
                upto = text_at(k + m)
                if upto is None or not upto.startswith(prefix):
                    break
                if not full_text.startswith(upto):
                    continue  # ends inside a character (decoded as U+FFFD): one more token completes it
                piece = upto[len(prefix):]
                if not piece.strip() or REPLACEMENT in piece:
                    continue  # an empty, blank or half-character piece: take one more token
                if full_text.find(piece) == len(prefix):
                    return StopPick(piece, prefix, k)
                # it occurs earlier in the text: a longer piece from this boundary may not
    return None


def stop_for(capture_runs, prompt, completion, *, tokenizer=None, extra: dict | None = None) -> StopPick | None:
    """A stop string for ``prompt``'s greedy ``completion`` (from ``capture_runs.chat(prompt, ...)``)."""
    extra = dict(extra or {})
    content = completion.content
    ids = completion.body.get("completion_token_ids")
    if isinstance(ids, list) and ids and tokenizer is not None:
        def decoded(k: int) -> str:
            return tokenizer.decode(ids[:k], skip_special_tokens=True)

        if decoded(len(ids)) == content:
            return pick_stop(content, decoded, len(ids))
    # Not usage: a server may count wrongly; the request's budget bounds the boundaries to try.
    steps = len(ids) if isinstance(ids, list) and ids else int(completion.request.get("max_tokens") or 16)

    def served(k: int) -> str | None:
        # the server's own greedy text for the first k tokens: no tokenizer needed
        return capture_runs.chat(prompt, k, **extra).content

    return pick_stop(content, served, steps)
