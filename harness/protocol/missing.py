"""What a target lacks, said once: the skip reason's prefix and the exception the protocol library raises.

The library imports no pytest: it raises ``FeatureMissing``, and the pytest face
(``capture_conformance.harness.pytest_plugin.plugin``) reports it as a skip whose reason starts with ``MISSING``;
the report lists each such thing once, in its "missing from protocol v1" summary.
"""

from __future__ import annotations

MISSING = "missing from protocol v1"


class FeatureMissing(Exception):
    """A check needs what the target does not have: a skip naming it, never a failure."""


def missing(what: str, dialect: str) -> None:
    """Stop the running check: ``what`` is not part of ``dialect``."""
    raise FeatureMissing(f"{MISSING}: {what} ({dialect} dialect)")
