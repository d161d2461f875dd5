"""Is the given ``--host`` a capture server at all? Answered once, before any test runs.

A reverse proxy's splash page answers 200 to everything; a different service
on the port answers 404; a stopped server refuses the connection. Each would
otherwise become hundreds of identical test failures, so the run stops with
one line instead. A server that says it is still loading (503 ``loading``) is
waited for, up to ``--startup-timeout``.
"""

from __future__ import annotations

import time

from capture_conformance.harness.protocol.client import CaptureClient, ServerFault, excerpt
from capture_conformance.harness.protocol.dialects import looks_like_capture_health

LOADING_POLL_S = 1.0
# The exit status of a run stopped because the server wants a key it was not given (or refused the
# one given): sysexits' EX_NOPERM, distinct from pytest's own statuses (0-5) and from a failed verdict.
EXIT_NEEDS_KEY = 77
KEY_VARIABLE = "CAPTURE_API_KEY"
# A request that needs a key on a keyed server and costs nothing: the model listing (never a chat:
# some checks count every chat request the harness sends).
AUTH_PROBES = (("GET", "/v1/models", None),)


def probe_capture_server(base_url: str, api_key: str | None, wait_loading_s: float) -> str | None:
    """None when ``base_url`` answers ``/health`` like a capture server, else one line saying why not."""
    client = CaptureClient(base_url, api_key=api_key, timeout_s=10.0)
    deadline = time.monotonic() + wait_loading_s
    while True:
        try:
            answer = client.health()
        except ServerFault as exc:
            return f"capture-conformance: {base_url} is unreachable: {str(exc).splitlines()[0]}"
        body = None
        try:
            body = answer.json()
        except ServerFault:
            pass
        if not looks_like_capture_health(body):  # v1 and the older family: 'status'; interventions: 'ok'
            kind = answer.content_type or "no content type"
            return (f"capture-conformance: {base_url} is not a capture server: GET /health answered "
                    f"{answer.status} {kind}, not JSON with 'status' (or 'ok' for the interventions family): "
                    f"{excerpt(answer.content, 120) or '<empty body>'}")
        if answer.status == 503 and body.get("status") == "loading" and time.monotonic() < deadline:
            time.sleep(LOADING_POLL_S)
            continue
        if answer.status != 200:
            return (f"capture-conformance: {base_url} is not ready: GET /health answered {answer.status} "
                    f"{excerpt(answer.content, 120)}")
        return None


def probe_key(base_url: str, api_key: str | None) -> str | None:
    """None when an authenticated request is not refused, else one line: the key is missing or wrong.

    ``/health`` is open on keyed servers, so the probe above cannot tell; without this
    every test would fail on a 401 and the diagnoses would name a hundred symptoms.
    """
    client = CaptureClient(base_url, api_key=api_key, timeout_s=10.0)
    for method, path, body in AUTH_PROBES:
        try:
            answer = client.request(method, path, json=body)
        except ServerFault:
            return None  # reachability is the other probe's business
        if answer.status in (401, 403):
            if api_key:
                return (f"capture-conformance: {base_url} refused the key given (--api-key or ${KEY_VARIABLE}): "
                        f"{method} {path} answered {answer.status}")
            return (f"capture-conformance: the server wants a key: pass --api-key or ${KEY_VARIABLE} "
                    f"({method} {path} answered {answer.status})")
    return None
