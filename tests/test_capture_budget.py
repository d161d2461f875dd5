"""Issue 14: the in-flight capture budget (``--capture-budget-mb``), in process.

The tiny model's `_logits` are 151,936 float32 per token (0.58 MiB); a capture
holds twice its size of the budget (admission.HOST_COPIES).
"""

from __future__ import annotations

import json

import pytest

from conftest import chat_body, make_client
from capture_conformance.reference_server.admission import CaptureBudget, default_budget_bytes
from capture_conformance.reference_server.errors import Overloaded, Unprocessable

CHAT = "/v1/chat/completions"
MIB = 2**20
LOGITS_PER_TOKEN = 151936 * 4


@pytest.fixture
def small(registry, tmp_path):
    with make_client(registry, tmp_path / "s", capture_budget_mb=8.0) as c:
        assert c.app.state.readiness.ready.wait(30)
        yield c


def _budget(client) -> dict:
    return client.get("/health").json()["capture_budget"]


def test_reservations_add_up_refuse_over_the_limit_and_release_once():
    budget = CaptureBudget(10 * MIB)
    first = budget.reserve(2 * MIB)  # holds 4 MiB
    second = budget.reserve(3 * MIB)  # holds 6 MiB: 10 of 10
    with pytest.raises(Overloaded) as busy:
        budget.reserve(1)
    assert busy.value.status_code == 503 and busy.value.headers == {"Retry-After": "1"}
    first.release()
    first.release()  # idempotent: a second release must not free budget held by others
    snap = budget.snapshot()
    assert (snap["in_use_mb"], snap["in_flight"], snap["admitted"], snap["refused"], snap["peak_mb"]) == (6, 1, 2, 1, 10)
    with pytest.raises(Unprocessable, match="--capture-budget-mb"):
        budget.reserve(6 * MIB)  # 12 MiB could never fit: not worth a retry
    second.release()
    assert budget.snapshot()["in_use_mb"] == 0
    assert budget.reserve(0) is budget.reserve(0)  # no capture, no reservation


def test_the_default_budget_is_derived_from_available_memory():
    limit, how = default_budget_bytes()
    assert limit > 0 and "available" in how


def test_a_capture_that_can_never_fit_is_422_naming_the_option(small):
    response = small.post(CHAT, json=chat_body(max_tokens=8, capture={}))  # 4.6 MiB x 2 > 8 MiB
    assert response.status_code == 422 and "--capture-budget-mb" in response.json()["detail"], response.text
    # tokens "last" writes one step, but a batched generate keeps every step until it ends:
    # 2 x 0.58 MiB of files + 14 x 0.58 MiB held = 9.3 MiB > 8 MiB
    response = small.post(CHAT, json=chat_body(max_tokens=14, capture={"tokens": "last"}))
    assert response.status_code == 422 and "--capture-budget-mb" in response.json()["detail"], response.text
    assert _budget(small)["in_use_mb"] == 0


def test_a_busy_budget_is_503_with_retry_after_and_health_shows_it(small):
    held = small.app.state.budget.reserve(3 * MIB)  # another capture in flight: 6 of 8 MiB
    try:
        assert _budget(small)["in_use_mb"] == 6.0 and _budget(small)["in_flight"] == 1
        response = small.post(CHAT, json=chat_body(max_tokens=4, capture={}))  # needs 4.6 MiB
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert "--capture-budget-mb" in response.json()["error"]["message"]
        plain = small.post(CHAT, json=chat_body(max_tokens=4))  # no capture: nothing to hold
        assert plain.status_code == 200, plain.text
        assert _budget(small)["refused"] == 1
    finally:
        held.release()
    response = small.post(CHAT, json=chat_body(max_tokens=4, capture={}))
    assert response.status_code == 200, response.text
    budget = _budget(small)
    assert budget["in_use_mb"] == 0 and budget["in_flight"] == 0
    assert budget["peak_mb"] == 6.0  # the refused request never held any


def test_the_budget_is_held_until_the_files_are_written(small, monkeypatch):
    from capture_conformance.reference_server import service as service_module

    seen = []
    original = service_module.CaptureService._store

    def store(self, generation, plan, options):
        seen.append(self.budget.snapshot()["in_use_mb"])  # on the writer thread, before the files exist
        return original(self, generation, plan, options)

    monkeypatch.setattr(service_module.CaptureService, "_store", store)
    response = small.post(CHAT, json=chat_body(max_tokens=2, capture={}))
    assert response.status_code == 200, response.text
    assert seen == [pytest.approx(2 * 2 * LOGITS_PER_TOKEN / MIB, abs=0.01)]
    assert _budget(small)["in_use_mb"] == 0


def test_failed_and_streamed_captures_give_their_budget_back(small, monkeypatch):
    from capture_conformance.reference_server import service as service_module

    def broken(self, *args, **kwargs):
        raise OSError("disk on fire")

    with monkeypatch.context() as patch:
        patch.setattr(service_module.CaptureService, "_store", broken)
        assert small.post(CHAT, json=chat_body(max_tokens=2, capture={})).status_code == 500
    assert _budget(small)["in_use_mb"] == 0

    response = small.post(CHAT, json=chat_body(max_tokens=3, capture={}, stream=True))
    assert response.status_code == 200
    events = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]" and "activations_meta" in json.loads(events[-2])
    budget = _budget(small)
    assert budget["in_use_mb"] == 0 and budget["in_flight"] == 0 and budget["admitted"] == 2


def test_test_pure_nnsight_is_budgeted_too(small):
    response = small.post("/test_pure_nnsight", json={"max_new_tokens": 8})
    assert response.status_code == 422 and "--capture-budget-mb" in response.json()["detail"], response.text


def test_a_held_future_keeps_the_budget_past_release():
    from concurrent.futures import Future

    budget = CaptureBudget(10 * MIB)
    reservation = budget.reserve(MIB)
    generation, write = Future(), Future()
    reservation.hold(generation)
    reservation.hold(write)
    reservation.release()  # the client hung up: the response is over, the work is not
    assert budget.snapshot()["in_use_mb"] == 2
    generation.set_result(None)
    assert budget.snapshot()["in_use_mb"] == 2
    write.set_exception(OSError("disk full"))
    assert budget.snapshot()["in_use_mb"] == 0 and budget.snapshot()["in_flight"] == 0
    reservation.release()
    assert budget.snapshot()["in_use_mb"] == 0
