"""Area health: ``GET /health`` says whether the server can serve, and nothing else needs a key."""

from __future__ import annotations

import pytest

from capture_conformance.harness import PROTOCOL_VERSIONS
from capture_conformance.harness.protocol.dialects import INTERVENTIONS, V1, missing

pytestmark = pytest.mark.area("health")


@pytest.mark.smoke
def test_health_is_ok_and_lists_the_model(capture_client, capture_model, capture_dialect):
    body = capture_client.health().ok_json()
    if capture_dialect == INTERVENTIONS:
        assert body.get("ok") is True and body.get("model") == capture_model, (
            f"/health of the interventions dialect should be {{'ok': true, 'model': {capture_model!r}}}: {body}")
        missing("/health 'status' and 'loaded_models'", capture_dialect)
    assert body.get("status") == "ok", f"/health status is {body.get('status')!r}, expected 'ok': {body}"
    loaded = body.get("loaded_models")
    assert isinstance(loaded, list) and all(isinstance(m, str) for m in loaded), (
        f"/health loaded_models should be a list of model ids: {body}")
    assert capture_model in loaded, f"/health does not list the model under test {capture_model!r}: {body}"
    assert len(loaded) == len(set(loaded)), f"/health lists a model twice: {loaded}"


def test_health_reports_the_protocol_version(capture_client, capture_dialect):
    body = capture_client.health().ok_json()
    if "protocol" not in body and capture_dialect != V1:
        missing("/health 'protocol'", capture_dialect)
    assert "protocol" in body, f"/health has no 'protocol' field (an older-family server?): {body}"
    assert body["protocol"] in PROTOCOL_VERSIONS, (
        f"/health protocol is {body['protocol']!r}, expected one of {list(PROTOCOL_VERSIONS)}")


@pytest.mark.managed_server
def test_health_is_503_loading_until_the_model_is_usable_then_200(capture_target, capture_model):
    """Seen while this run waited for the server it started: 503 ``loading``, then 200 with the model."""
    trace = capture_target.startup_trace
    assert trace, "no /health answers were recorded while the server started"
    ready = trace[-1]
    assert ready.status == 200 and isinstance(ready.body, dict) and capture_model in ready.body.get("loaded_models", []), (
        f"the last startup answer should be 200 listing {capture_model!r}: {ready.brief()}")
    before = [p for p in trace[:-1] if p.status is not None]
    wrong = [p for p in before if p.status != 503 or not isinstance(p.body, dict) or p.body.get("status") != "loading"]
    assert not wrong, (
        "before the model was usable /health must answer 503 {\"status\": \"loading\"}; it answered "
        + "; ".join(p.brief() for p in wrong[:3]))
    assert before, (
        f"/health never answered 503 'loading' while the server started: the first answer "
        f"({ready.brief()}) already said ready, so 'ok' does not wait for the model")


@pytest.mark.needs_api_key
def test_health_needs_no_api_key(capture_client):
    answer = capture_client.health(authorized=False)
    assert answer.status == 200, f"/health must not require the API key: {answer.describe()}"


@pytest.mark.needs_api_key
@pytest.mark.parametrize("path", ["/v1/models", "/v1/activations/no-such-run/_logits"])
def test_requests_without_the_api_key_are_401(capture_client, path):
    answer = capture_client.get(path, authorized=False)
    assert answer.status == 401, f"GET {path} without the API key should be 401: {answer.describe()}"
    wrong = capture_client.get(path, headers={"Authorization": "Bearer wrong-key"})
    assert wrong.status == 401, f"GET {path} with a wrong API key should be 401: {wrong.describe()}"
