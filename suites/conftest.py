"""Activates the harness's fixtures for the suites, and only for them."""

from capture_conformance.harness.pytest_plugin.fixtures import (  # noqa: F401  (pytest finds fixtures by name in this module)
    capture_client,
    capture_dialect,
    capture_features,
    capture_model,
    capture_options,
    capture_runs,
    capture_target,
    ground_truth,
    model_layout,
    shape_snapshot,
)
from capture_conformance.harness.pytest_plugin.value_fixtures import server_model_dtype, value_checks, value_reference  # noqa: E402,F401
from capture_conformance.harness.pytest_plugin.fleet_fixtures import fleet_parity  # noqa: E402,F401
