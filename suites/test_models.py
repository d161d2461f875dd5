"""Area models: ``/v1/models`` and ``/models/load`` (load, idempotent reload, failed load keeps the old model)."""

from __future__ import annotations

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.dialects import V1, missing
from capture_conformance.harness.protocol.features import MISSING, absent_note, route_absent

pytestmark = pytest.mark.area("models")

# Ids that no server can load, and that fail fast even without network (no hub lookup times out).
UNLOADABLE_IDS = ["/nonexistent/capture-conformance-model", "no such model"]


def _model_entry(capture_client, model: str) -> dict:
    body = capture_client.models().ok_json()
    assert body.get("object") == "list" and isinstance(body.get("data"), list), (
        f"/v1/models should be an OpenAI list: {body}")
    entries = [e for e in body["data"] if isinstance(e, dict) and e.get("id") == model]
    assert len(entries) == 1, f"/v1/models should list {model!r} once: {[e.get('id') for e in body['data']]}"
    return entries[0]


def _still_serving(capture_client, capture_runs, model: str, after: str) -> None:
    health = capture_client.health().ok_json()
    assert model in health.get("loaded_models", []), f"after {after}, /health no longer lists {model!r}: {health}"
    completion = capture_runs.chat(prompts.SHORT_ANSWER, 4, cached=False)
    assert completion.usage.completion_tokens >= 1, f"after {after}, {model!r} generated nothing"


@pytest.mark.smoke
def test_models_list_is_openai_shaped(capture_client, capture_model):
    entry = _model_entry(capture_client, capture_model)
    assert entry.get("object") == "model", f"model entry should have object 'model': {entry}"


def test_models_capture_block_matches_ground_truth(capture_client, capture_model, ground_truth, capture_dialect):
    entry = _model_entry(capture_client, capture_model)
    block = entry.get("capture")
    if block is None and capture_dialect != V1:
        missing("/v1/models 'capture' block", capture_dialect)
    assert isinstance(block, dict), (
        f"/v1/models entry of {capture_model!r} has no 'capture' block (an older-family server?): {entry}")
    for key, expected in (("vocab_size", ground_truth.vocab_size), ("hidden_size", ground_truth.hidden_size),
                          ("num_layers", ground_truth.num_layers)):
        assert isinstance(block.get(key), int), f"capture.{key} should be an int: {block.get(key)!r}"
        if expected is not None:
            assert block[key] == expected, (
                f"capture.{key} is {block[key]}, the model has {expected} (ground truth: {ground_truth.source})")
    assert block.get("dtype") in ("float32", "bfloat16", "float16", "torch.float32", "torch.bfloat16",
                                  "torch.float16"), f"capture.dtype should name a float dtype: {block.get('dtype')!r}"
    savepoints = block.get("savepoints")
    assert isinstance(savepoints, list) and savepoints and all(isinstance(s, str) for s in savepoints), (
        f"capture.savepoints should be a non-empty list of selectors: {savepoints!r}")


def test_loading_the_loaded_model_again_is_a_noop(capture_client, capture_runs, capture_model):
    for attempt in (1, 2):
        answer = capture_client.load_model(capture_model)
        if route_absent(answer):
            raise AssertionError(f"{MISSING}: POST /models/load ({absent_note(answer)})")
        body = answer.ok_json()
        assert body.get("ok") is True and body.get("model") == capture_model, (
            f"POST /models/load #{attempt} of the loaded model should answer {{'ok': true, 'model': "
            f"{capture_model!r}}}: {body}")
    _still_serving(capture_client, capture_runs, capture_model, "reloading it")


@pytest.mark.parametrize("model_id", UNLOADABLE_IDS)
def test_failed_load_is_4xx_and_the_old_model_keeps_serving(capture_client, capture_runs, capture_model,
                                                           capture_features, model_id):
    capture_features.require("POST /models/load")  # a missing route's 404 is no "failed load"
    answer = capture_client.load_model(model_id)
    # 403: a server whose load policy does not open this id (protocol 1.2) refuses it as surely.
    assert answer.status in (403, 404, 422), f"loading {model_id!r} should be 403, 404 or 422: {answer.describe()}"
    body = answer.json_object()
    assert "detail" in body, f"error body should be {{'detail': ...}}: {answer.describe()}"
    _still_serving(capture_client, capture_runs, capture_model, f"a failed load of {model_id!r}")
    _model_entry(capture_client, capture_model)
