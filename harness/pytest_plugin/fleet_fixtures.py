"""Fixtures of the parity area: every host of a fleet run at once.

The other areas see one host at a time (``capture_target`` is a parametrisation
in a fleet run); the parity area replays the same greedy requests on all of them
and judges each host against the others (``harness/protocol/parity.py``).
Imported by ``suites/conftest.py`` only, like the other suite fixtures.
"""

from __future__ import annotations

import math

import pytest

from capture_conformance.harness.protocol.cleanup import RunLedger
from capture_conformance.harness.protocol.client import CaptureClient
from capture_conformance.harness.protocol.dialects import loaded_models
from capture_conformance.harness.protocol.ground_truth import locate_model_dir
from capture_conformance.harness.protocol.layout import discover_layout
from capture_conformance.harness.protocol.parity import ParityTable, run_parity
from capture_conformance.harness.protocol.reference import get_reference
from capture_conformance.harness.protocol.runs import CaptureRuns
from capture_conformance.harness.pytest_plugin.state import STATE, options_of

PARITY_FACT = "parity"  # the fleet's own fact (no host prefix): the table of the fleet page


@pytest.fixture(scope="session")
def fleet_parity(pytestconfig: pytest.Config) -> ParityTable:
    """The fleet's parity table: computed once, recorded for the fleet page, its runs deleted afterwards."""
    options = options_of(pytestconfig)
    targets, ledgers = [], []
    for url in options.remote_urls:
        client = CaptureClient(url, api_key=options.api_key, timeout_s=options.request_timeout)
        ledger = RunLedger()
        client.observers.append(ledger.observe)
        ledgers.append((client, ledger))
        model = options.model or _first_loaded(client)
        block = client.capture_block(model) or {}
        dtype = block.get("dtype") if isinstance(block.get("dtype"), str) else None
        model_dir = locate_model_dir(model)
        layout = discover_layout(str(model_dir) if model_dir else None, lambda c=client, m=model: c.listed_savepoints(m))
        features = block.get("features") if isinstance(block.get("features"), list) else []
        targets.append((url, CaptureRuns(client, model), layout, dtype, "prompt" in features))
    try:
        table = run_parity([t[:4] for t in targets], with_prompt_positions=all(t[4] for t in targets),
                           reference=_reference(pytestconfig, targets))
    finally:
        for client, ledger in ledgers:
            ledger.clean(client, keep=options.keep_runs)
    pytestconfig.stash[STATE].facts[PARITY_FACT] = _json_safe(table.as_dict())
    return table


def _reference(config: pytest.Config, targets: list) -> object | None:
    """The values area's reference of the fleet's model, where it is available locally (else None)."""
    models = {t[1].model for t in targets}
    if len(models) != 1:
        return None  # hosts serving different ids: no one reference stands for all of them
    model = models.pop()
    model_dir = locate_model_dir(model)
    status = get_reference(model, reference_model=config.getoption("reference_model", None),
                           device=config.getoption("reference_device", None) or "cpu",
                           model_dir=str(model_dir) if model_dir else None)
    return status.reference if status.available else None


def _first_loaded(client: CaptureClient) -> str:
    loaded = loaded_models(client.health().ok_json(), "protocol-v1")
    if not loaded:
        pytest.fail(f"{client.base_url}: /health lists no loaded model; pass --model", pytrace=False)
    return str(loaded[0])


def _json_safe(value):
    """``inf`` (no comparison was possible) as None: the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
