"""The fault matrix: the conformance suites must pass the reference server and catch every injected fault.

One case per fault in ``reference_server/faults.py`` plus the unfaulted server
(``none``). Each case runs ``capture-conformance --profile core`` in a
subprocess against ``python -m reference_server --fault NAME`` and asserts:

- unfaulted: exit status 0, the report passed, no failing test;
- faulted: the run failed, and at least one failing test is in the fault's own
  area (its suite module), so the fault is caught where it lives, not only by
  accident elsewhere.

With ``KILL_RATE_OUT=DIR`` each case also writes its result to ``DIR/<case>.json``;
``python -m tests.fault_matrix render DIR > docs/kill-rate.md`` turns them into the
kill-rate page.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fault_matrix import CASE_TIMEOUT_S, OUT_ENV, UNFAULTED, run_case, save, subprocess_env
from harness.plugin import SUITES_DIR
from harness.report import AREAS, OPTIONAL_AREAS
from reference_server.faults import FAULTS

# The faults that issue 4 names, by their number there.
ISSUE_FAULTS = {
    1: "first_step_only",
    2: "shifted_logits",
    3: "bf16_file_fp32_meta",
    4: "wrong_size",
    5: "zero_usage",
    6: "no_chat_template",
    7: "truncated_hidden",
    8: "nan_values",
    9: "swapped_names",
    10: "state_leak",
    11: "no_lock",
    12: "unknown_selector_500",
    13: "health_without_model",
    14: "missing_file",
    15: "load_drops_model",
    16: "ids_skip_first",
    17: "sampling_ooo_500",
    18: "last_is_first",
}


def test_the_registry_covers_every_fault_the_issue_names():
    missing = {n: name for n, name in ISSUE_FAULTS.items() if name not in FAULTS}
    assert not missing, f"faults named in issue 4 with no entry in reference_server/faults.py: {missing}"
    assert len(set(ISSUE_FAULTS.values())) == 18


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_each_fault_lives_in_an_existing_suite_area(name):
    fault = FAULTS[name]
    assert fault.name == name
    module = SUITES_DIR / f"test_{fault.area}.py"
    assert module.is_file(), f"fault {name!r} names area {fault.area!r}, but there is no {module}"
    areas = AREAS + OPTIONAL_AREAS
    assert fault.area in areas, f"fault {name!r}: area {fault.area!r} is not one of the report's areas {areas}"
    assert fault.description.strip(), f"fault {name!r} has no description"


def test_the_cases_run_offline_without_the_outer_pytest_identity(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    env = subprocess_env()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert not any(k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST")) for k in env), sorted(env)


@pytest.mark.timeout(CASE_TIMEOUT_S + 60)
@pytest.mark.parametrize("case", [UNFAULTED, *FAULTS])
def test_fault_matrix(case, tiny_model_dir, tmp_path):
    # tiny_model_dir: the embedded model is built (once, into the shared cache) before any server starts.
    result = run_case(case, tmp_path)
    out = os.environ.get(OUT_ENV)
    if out:
        save(result, Path(out))
    assert result.report_found, f"no conformance report was written\n{result.explain()}"
    if case == UNFAULTED:
        assert result.exit_code == 0 and result.report_passed and not result.failures, (
            f"the unfaulted reference server does not pass profile core\n{result.explain()}")
        assert result.passed > 0, f"nothing ran against the unfaulted server\n{result.explain()}"
        return
    assert result.caught, f"fault {case!r} was NOT caught: the suites passed a faulty server\n{result.explain()}"
    assert result.own_area_failures, (
        f"fault {case!r} was caught only outside its own area {result.area!r}\n{result.explain()}")
    # A realistic fault is a server that runs and gets most things right, not one that dies on start.
    assert result.passed > 0, f"fault {case!r}: no test passed at all; is it a crash, not a bug?\n{result.explain()}"
