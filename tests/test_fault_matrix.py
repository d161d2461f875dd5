"""The fault matrix: the conformance suites must pass the reference server and catch every injected fault.

One case per fault in ``tests/faults.py`` plus the unfaulted server
(``none``). Each case runs ``capture-conformance --profile core`` in a
subprocess against ``python tests/faulty_server.py --fault NAME`` and asserts:

- unfaulted: every area runs; exit status 0, the report passed, no failing test;
- faulted: only the fault's own area runs (``--area``: the unfaulted case proves
  every other area passes), and it fails, so the fault is caught where it lives.

With ``KILL_RATE_OUT=DIR`` each case also writes its result to ``DIR/<case>.json``;
``python -m tests.fault_matrix render DIR > docs/kill-rate.md`` turns them into the
kill-rate page.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fault_matrix import CASE_TIMEOUT_S, OUT_ENV, UNFAULTED, run_case, save, subprocess_env
from capture_conformance.harness.pytest_plugin.areas import BY_NAME, MARKER
from capture_conformance.harness.pytest_plugin.plugin import SUITES_DIR
from faults import FAULTS
from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID
from capture_conformance.fixtures.zoo import BUILTIN_IDS, ensure_builtin

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
    assert not missing, f"faults named in issue 4 with no entry in tests/faults.py: {missing}"
    assert len(set(ISSUE_FAULTS.values())) == 18


def test_the_readme_counts_the_faults_there_are():
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    said = re.search(r"proven against (\d+) realistic injected faults", readme)
    assert said and int(said.group(1)) == len(FAULTS), f"README says {said and said.group(1)}, faults.py has {len(FAULTS)}"
    families = re.search(r"in each of (\w+) architecture families", readme).group(1)
    assert families == {9: "nine"}.get(len(BUILTIN_IDS), str(len(BUILTIN_IDS))), (families, BUILTIN_IDS)


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_each_fault_lives_in_an_existing_suite_area(name):
    fault = FAULTS[name]
    assert fault.name == name
    assert fault.area in BY_NAME, f"fault {name!r}: area {fault.area!r} is not one of the areas {sorted(BY_NAME)}"
    declaring = [p.name for p in SUITES_DIR.glob("test_*.py")
                 if f'pytestmark = pytest.mark.{MARKER}("{fault.area}")' in p.read_text()]
    assert declaring, f"fault {name!r} names area {fault.area!r}, but no suite module declares it"
    assert fault.description.strip(), f"fault {name!r} has no description"


def test_the_shipped_server_has_no_fault_switch_and_no_fault_code():
    import re
    from dataclasses import fields

    from capture_conformance import reference_server
    from capture_conformance.reference_server.cli import build_parser
    from capture_conformance.reference_server.settings import Settings

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--fault", "first_step_only"])
    assert "fault" not in {f.name for f in fields(Settings)}
    package = Path(reference_server.__file__).parent
    mentions = [f"{p.name}:{n}" for p in package.rglob("*.py")
                for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bfaults?\b", line)]
    assert not mentions, f"the shipped server mentions faults: {mentions}"


def test_the_cases_run_offline_without_the_outer_pytest_identity(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    env = subprocess_env()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert not any(k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST")) for k in env), sorted(env)


@pytest.mark.matrix
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


# Issue 18: the structural value faults, in every family of the zoo but the default (which the matrix above runs).
# Both are installed on one server per family: they touch disjoint blocks (0..L-2 served from their next
# block; L-1, which has no next, taken after the final norm), and one test of the values area (every block's
# output) must name both. Each installed fault rewrites what the ones before it chose, so the final-norm one
# goes first (L-1 -> norm), then the off-by-one (i -> i+1 for i < L-1: it leaves the norm alone).
STRUCTURAL = "last_layer_after_norm+layer_from_next"
ZOO_OTHERS = [m for m in BUILTIN_IDS if m != TINY_MODEL_ID]


@pytest.mark.matrix
@pytest.mark.timeout(CASE_TIMEOUT_S + 60)
@pytest.mark.parametrize("family", ZOO_OTHERS)
def test_a_neighbouring_block_and_a_last_block_after_the_final_norm_are_named_in_every_family(family, tmp_path):
    ensure_builtin(family)  # built once into the shared cache before the server and the harness both read it
    result = run_case(STRUCTURAL, tmp_path, model=family, only="test_decoder_layer_outputs_match_the_reference")
    assert result.caught and result.own_area_failures, f"{STRUCTURAL} on {family} was NOT caught\n{result.explain()}"
    said = " ".join(f.detail for f in result.own_area_failures)
    assert "`layer_0`" in said and "matches layer 1 of the reference" in said, result.explain()
    assert "(the last layer after the final norm)" in said, result.explain()
