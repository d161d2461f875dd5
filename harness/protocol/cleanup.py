"""Leave no trace: the runs a conformance run created on the target, and their deletion at its end.

A run of the suites stores some hundred captures; on a server without a retention
limit they would stay, and a production server's disk would fill with test data.
A ``RunLedger`` observes every answer of a client (``CaptureClient.observers``),
keeps each ``activation_run_id`` it sees (in JSON answers and in streamed chunks),
and deletes them all at the end with the protocol's ``DELETE /v1/activations/{run}``.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field

from capture_conformance.harness.protocol.client import Answer, CaptureClient, ServerFault

# 404: already gone (a test deleted it, or retention did); both count as cleaned up.
GONE = (200, 202, 204, 404)
NO_DELETE = (405, 501)
_RUN_ID = re.compile(rb'"activation_run_id"\s*:\s*"([^"\\]{1,200})"')


@dataclass
class Cleanup:
    created: int
    deleted: int
    left: int
    why: str = ""

    def as_dict(self) -> dict:
        return {"created": self.created, "deleted": self.deleted, "left": self.left, "why": self.why}


@dataclass
class RunLedger:
    run_ids: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, answer: Answer) -> None:
        """A client observer: remember the run id of every successful capture answer (thread-safe)."""
        if answer.method != "POST" or answer.status != 200 or b"activation_run_id" not in answer.content:
            return
        found = []
        try:
            body = json.loads(answer.content)
            run_id = body.get("activation_run_id") if isinstance(body, dict) else None
            found = [run_id] if isinstance(run_id, str) and run_id else []
        except (ValueError, UnicodeDecodeError):  # a stream: the id is in its last chunk
            found = [m.decode("utf-8", "replace") for m in _RUN_ID.findall(answer.content)]
        with self._lock:
            self.run_ids.extend(r for r in dict.fromkeys(found) if r not in self.run_ids)

    def clean(self, client: CaptureClient, *, keep: bool = False) -> Cleanup:
        """Delete every run seen, unless ``keep``; say how many were left and why."""
        with self._lock:
            run_ids = list(self.run_ids)
        if keep:
            return Cleanup(len(run_ids), 0, len(run_ids), "kept on request (--keep-runs)" if run_ids else "")
        deleted, failures = 0, []
        for position, run_id in enumerate(run_ids):
            try:
                answer = client.delete(f"/v1/activations/{run_id}")
            except ServerFault as exc:
                failures.append(f"DELETE failed: {str(exc).splitlines()[0]}")
                continue
            if answer.status in GONE:
                deleted += 1
            elif answer.status in NO_DELETE:
                return Cleanup(len(run_ids), deleted, len(run_ids) - deleted,
                               f"the server has no DELETE for runs ({answer.status})")
            else:
                failures.append(f"DELETE answered {answer.status}")
        left = len(run_ids) - deleted
        return Cleanup(len(run_ids), deleted, left, failures[0] if failures else "")


def merge(cleanups: list[dict]) -> dict | None:
    """One summary of the cleanups of several processes (pytest-xdist workers)."""
    if not cleanups:
        return None
    total = {k: sum(c.get(k, 0) for c in cleanups) for k in ("created", "deleted", "left")}
    total["why"] = next((c["why"] for c in cleanups if c.get("why")), "")
    return total
