"""Which optional routes and features the target has, told apart from a contract broken.

A server without a route answers the web framework's 404 for an unknown path
(``{"detail": "Not Found"}`` from FastAPI/Starlette, an HTML or plain-text page
from others) or 405. That 404 must never count as the pass of a contract about
the feature ("a failed load is 4xx"), and must not fail every test that touches
the feature either: the test that checks the feature itself fails once, saying
it is absent, and the other tests of it are skipped with a reason that starts
with ``MISSING`` so the report lists them once, in its "missing from protocol v1"
summary.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from capture_conformance.harness.protocol.client import Answer, CaptureClient, ServerFault
from capture_conformance.harness.protocol.missing import MISSING, FeatureMissing
from capture_conformance.harness.protocol.responses import SavepointMeta
from capture_conformance.harness.protocol.tensors import size_cap

# What web frameworks put in the body of their own 404 for an unknown path.
GENERIC_NOT_FOUND = {"not found", "404 not found", "404: not found", "404 page not found", "the requested url was not found on the server."}


def route_absent(answer: Answer) -> bool:
    """Whether ``answer`` is a framework's "no such route" (405, or a 404 that names nothing)."""
    if answer.status == 405:
        return True
    if answer.status != 404:
        return False
    try:
        body = answer.json()
    except ServerFault:
        return True  # an HTML or text 404 page: the framework's, not the protocol's {"detail": ...}
    if not isinstance(body, dict):
        return True
    detail = body.get("detail", body.get("error", body.get("message")))
    if isinstance(detail, dict):
        detail = detail.get("message")
    return not isinstance(detail, str) or detail.strip().lower().rstrip(".") in {
        g.rstrip(".") for g in GENERIC_NOT_FOUND}


def absent_note(answer: Answer) -> str:
    return f"{answer.endpoint} answered {answer.status} {answer.text.strip()[:80]!r}: the route does not exist"


@dataclass
class Features:
    """Probed once per session, on first use; ``require`` skips a test whose feature is absent."""

    client: CaptureClient
    model: str
    dialect: str = "protocol-v1"
    _seen: dict[str, str | None] = field(default_factory=dict)  # feature -> None (present) or why absent
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def absent(self, feature: str) -> str | None:
        with self._lock:
            if feature not in self._seen:
                self._seen[feature] = self._probe(feature)
            return self._seen[feature]

    def require(self, feature: str) -> None:
        why = self.absent(feature)
        if why:
            raise FeatureMissing(f"{MISSING}: {feature} ({why})")

    def _probe(self, feature: str) -> str | None:
        try:
            if feature == "POST /models/load":
                answer = self.client.load_model(self.model)
            elif feature == "POST /test_pure_nnsight":
                answer = self.client.pure_nnsight(model=self.model, max_new_tokens=1)
            elif feature == "GET /v1/activations/{run_id}/{name}":
                return self._probe_downloads()
            elif feature == "DELETE /v1/activations/{run_id}":
                answer = self.client.delete("/v1/activations/capture-conformance-probe-0")
            else:
                raise ValueError(f"unknown feature {feature!r}")
        except ServerFault:
            return None  # it answered wrongly or not at all: that is a defect for its own tests to report
        return absent_note(answer) if route_absent(answer) else None

    def _probe_downloads(self) -> str | None:
        """Present when a real capture's ``url`` downloads; absent when captures carry no url or it 404s."""
        answer = self.client.chat(self.model, "Say OK.", 1, store_activations=True)
        if answer.status != 200:
            return None  # captures fail: the capture tests say so; do not guess about downloads
        body = answer.json_object()
        meta = body.get("activations_meta")
        if not isinstance(meta, dict) or not meta:
            # a v1 server that fails to capture is a defect for the capture tests; another dialect lacks it
            return None if self.dialect == "protocol-v1" else "captures carry no activations_meta to download"
        name, entry = next(iter(meta.items()))
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url:
            return "the capture metadata has no 'url' to download a file from"
        try:  # the same byte cap as every download: what the metadata admits to
            cap = size_cap(SavepointMeta(name, entry).advertised_numel, str(entry.get("dtype")))
        except ServerFault:
            return None  # malformed metadata: the capture tests name it
        got = self.client.get(url, max_bytes=cap)
        return absent_note(got) if route_absent(got) else None
