"""``--help`` text from a module's docstring, without its reST markup (``double backquotes``)."""

from __future__ import annotations


def plain(text: str) -> str:
    return text.replace("``", "")


def summary(doc: str | None) -> str:
    """The docstring's first paragraph, plain."""
    return plain((doc or "").split("\n\n")[0])


def details(doc: str | None) -> str:
    """Everything after the first paragraph, plain (an epilog)."""
    parts = (doc or "").split("\n\n", 1)
    return plain(parts[1]) if len(parts) > 1 else ""
