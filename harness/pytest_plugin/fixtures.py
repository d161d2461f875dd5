"""Fixtures of the conformance suites.

Imported by ``suites/conftest.py`` only, so that they exist where the suites are
collected and nowhere else: installing the plugin must not add a ``capture_client``
fixture (or start a server) in some unrelated project's tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capture_conformance.harness.protocol.cleanup import RunLedger
from capture_conformance.harness.protocol.client import CaptureClient, ServerFault
from capture_conformance.harness.protocol.dialects import V1, loaded_models
from capture_conformance.harness.protocol.dialects import detect as detect_dialect
from capture_conformance.harness.protocol.features import Features
from capture_conformance.harness.protocol.ground_truth import GroundTruth, resolve_ground_truth
from capture_conformance.harness.protocol.layout import Layout, discover_layout
from capture_conformance.harness.pytest_plugin.options import Options
from capture_conformance.harness.pytest_plugin.plugin import acquire_target
from capture_conformance.harness.pytest_plugin.state import STATE, Target, options_of
from capture_conformance.harness.protocol.runs import CaptureRuns
from capture_conformance.harness.pytest_plugin.snapshots import ShapeSnapshot, ci_from_env


@pytest.fixture(scope="session")
def capture_options(pytestconfig: pytest.Config) -> Options:
    return options_of(pytestconfig)


@pytest.fixture(scope="session")
def capture_target(pytestconfig: pytest.Config, request: pytest.FixtureRequest) -> Target:
    """The server under test; in a fleet run (several ``--host``) a parametrisation, one host at a time."""
    host = getattr(request, "param", None)
    if host is None:
        return acquire_target(pytestconfig)
    pytestconfig.stash[STATE].current_host = host
    return Target(host, managed=False)


@pytest.fixture(scope="session")
def capture_client(capture_target: Target, capture_options: Options, pytestconfig: pytest.Config):
    """The session's client; every run it sees created is deleted at the end (unless --keep-runs)."""
    client = CaptureClient(capture_target.base_url, api_key=capture_options.api_key,
                           timeout_s=capture_options.request_timeout, on_connection_error=capture_target.death_note)
    ledger = RunLedger()
    client.observers.append(ledger.observe)
    yield client
    client.observers.remove(ledger.observe)
    outcome = ledger.clean(client, keep=capture_options.keep_runs)
    # One fact per process: xdist workers' facts are merged key by key in the controller.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    _record_fact(pytestconfig, f"cleanup:{worker}", outcome.as_dict())


@pytest.fixture(scope="session")
def capture_dialect(capture_client: CaptureClient, capture_options: Options, pytestconfig: pytest.Config) -> str:
    """The server family spoken: ``--dialect``, else detected from ``/health``."""
    if capture_options.dialect != "auto":
        dialect = capture_options.dialect
    else:
        try:
            dialect = detect_dialect(capture_client.health().json())
        except ServerFault:
            dialect = V1
    _record_fact(pytestconfig, "dialect", dialect)
    return dialect


@pytest.fixture(scope="session")
def capture_model(capture_client: CaptureClient, capture_target: Target, capture_options: Options,
                  capture_dialect: str, pytestconfig: pytest.Config) -> str:
    """The model under test, loaded on the target (``/models/load`` when it is not yet)."""
    health = capture_client.health().ok_json()
    loaded = loaded_models(health, capture_dialect)
    model = capture_options.model or capture_target.expected_model
    if model is None:
        if not loaded:
            pytest.fail(f"cannot tell which model to test: /health lists no loaded_models ({health}); pass --model",
                        pytrace=False)
        model = str(loaded[0])
    if model not in loaded:
        answer = capture_client.load_model(model)
        if answer.status != 200:
            pytest.fail(f"--model {model!r} is not loaded on the target and loading it failed: {answer.describe()}",
                        pytrace=False)
    _record_fact(pytestconfig, "model", model)
    return model


@pytest.fixture(scope="session")
def ground_truth(capture_model: str, capture_client: CaptureClient, capture_options: Options,
                 pytestconfig: pytest.Config) -> GroundTruth:
    def server_capture_block() -> dict | None:
        return capture_client.capture_block(capture_model)

    try:
        truth = resolve_ground_truth(capture_model, expect_vocab=capture_options.expect_vocab,
                                     expect_hidden=capture_options.expect_hidden,
                                     expect_layers=capture_options.expect_layers,
                                     server_capture_block=server_capture_block)
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)
    _record_fact(pytestconfig, "ground_truth", {
        "vocab_size": truth.vocab_size, "hidden_size": truth.hidden_size, "num_layers": truth.num_layers,
        "intermediate_size": truth.intermediate_size, "source": truth.source, "independent": truth.independent,
        "sources": dict(truth.sources), "from_server": truth.from_server,
        "tokenizer": "from the local model directory" if truth.model_dir else truth.tokenizer_note,
    })
    if not (truth.vocab_size and truth.hidden_size):
        pytest.fail(f"no ground truth for {capture_model}: no local config.json, no --expect-vocab/--expect-hidden, "
                    f"and the server's /v1/models gives no capture block", pytrace=False)
    return truth


@pytest.fixture(scope="session")
def model_layout(ground_truth: GroundTruth, capture_client: CaptureClient, capture_model: str,
                 pytestconfig: pytest.Config) -> Layout:
    """The model's savepoints by role (block stack, head, final norm...): every suite asks this, none names a module.

    From the local model's module tree where there is one, else the server's own
    ``capture.savepoints`` list (reported as not independent).
    """
    try:
        layout = discover_layout(ground_truth.model_dir, lambda: capture_client.listed_savepoints(capture_model))
    except LookupError as exc:
        _record_fact(pytestconfig, "layout", {"error": str(exc)})
        pytest.fail(f"cannot tell which savepoints {capture_model} has: {exc}; give the harness a local copy of the "
                    f"model (--model PATH) or have the server list capture.savepoints in /v1/models", pytrace=False)
    _record_fact(pytestconfig, "layout", layout.describe())
    return layout


@pytest.fixture(scope="session")
def capture_features(capture_client: CaptureClient, capture_model: str, capture_dialect: str) -> Features:
    return Features(capture_client, capture_model, capture_dialect)


@pytest.fixture(scope="session")
def capture_runs(capture_client: CaptureClient, capture_model: str, capture_dialect: str,
                 request: pytest.FixtureRequest) -> CaptureRuns:
    runs = CaptureRuns(capture_client, capture_model, dialect=capture_dialect)
    try:  # the tokenizer only sharpens usage diagnoses: a run without ground truth still gets its runs
        runs.tokenizer = request.getfixturevalue("ground_truth").tokenizer
    except (Exception, pytest.fail.Exception, pytest.skip.Exception):  # outcomes are not Exceptions
        runs.tokenizer = None
    return runs


@pytest.fixture
def shape_snapshot(request: pytest.FixtureRequest, capture_model: str, ground_truth: GroundTruth,
                   model_layout: Layout, capture_options: Options, pytestconfig: pytest.Config) -> ShapeSnapshot:
    root = Path(capture_options.snapshot_dir) if capture_options.snapshot_dir else None
    # --snapshot-update is syrupy's option (syrupy is a dependency; its name is the one people know).
    return ShapeSnapshot(node=request.node, model_id=capture_model, dims=ground_truth.dims(), root=root,
                         updating=bool(pytestconfig.getoption("update_snapshots", False)),
                         ci=capture_options.ci or ci_from_env(), selector_role=model_layout.role)


def _record_fact(config: pytest.Config, key: str, value: object) -> None:
    """Facts for the report (model, ground truth source); xdist workers send them to the controller."""
    config.stash[STATE].record(key, value)
