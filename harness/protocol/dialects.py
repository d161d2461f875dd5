"""Dialects: the server families the suites meet, told apart by what ``/health`` answers.

- ``protocol-v1``: this project's protocol (``/health`` has ``protocol``);
- ``store_activations``: the older family it extends (``/health`` has ``status`` and
  ``loaded_models`` but no ``protocol``; chat with ``store_activations``; no
  ``completion_token_ids``, ``activation_run_id`` or ``url``; no ``capture`` object);
- ``interventions``: ``/health`` is ``{"ok": true, "model": ...}``; capture is configured
  for all later requests by ``POST /v1/interventions``, never per request.

The suites talk to every dialect through the same fixtures. Where a check needs a
field or feature the dialect does not have, it is skipped with "missing from
protocol v1: <what> (<dialect> dialect)", and the report lists each such thing
once; every check whose fields exist runs as usual. ``--dialect`` forces one.
"""

from __future__ import annotations

from typing import Any

from capture_conformance.harness.protocol.missing import missing  # noqa: F401  (the suites import it from here too)

V1, STORE, INTERVENTIONS = "protocol-v1", "store_activations", "interventions"
DIALECTS = (V1, STORE, INTERVENTIONS)


def detect(health: Any) -> str:
    if not isinstance(health, dict):
        return V1
    if "protocol" in health:
        return V1
    if health.get("ok") is True and "status" not in health:
        return INTERVENTIONS
    if "status" in health:
        return STORE
    return V1


def looks_like_capture_health(health: Any) -> bool:
    """What the start-up probe accepts: a ``status`` (v1 and the older family) or ``{"ok": true}``."""
    return isinstance(health, dict) and ("status" in health or health.get("ok") is True)


def loaded_models(health: dict, dialect: str) -> list[str]:
    if dialect == INTERVENTIONS:
        model = health.get("model")
        return [model] if isinstance(model, str) else []
    loaded = health.get("loaded_models")
    return [str(m) for m in loaded] if isinstance(loaded, list) else []
