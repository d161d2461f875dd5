"""The harness against servers it has never seen: one correct server on another stack, and its defective twins.

``tests/other_stack_server.py`` is a protocol-v1 server written without
anything of this project's server (stdlib ``http.server``, plain transformers
forward hooks, its own random-weight model of a chosen family, with its own
tokenizer and chat template). The correct one must get a green
``capture-conformance --host … --port …`` on its first run, whatever the
family (snapshots recorded, then compared; ``--ci`` without a set fails). Each
``--defect`` must be named by the report's diagnoses, first, in plain words.
Every model is built in the module's temporary working directory, never in the
checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from capture_conformance.harness.protocol.server import ManagedServer
from conftest import free_port, inner_pytest_env

OTHER_SERVER = Path(__file__).with_name("other_stack_server.py")
INTERVENTIONS_SERVER = Path(__file__).with_name("interventions_server.py")
MODEL = "other-qwen3"  # a directory in the runs' working directory: the harness finds its config and tokenizer


def _env(ci: bool = False) -> dict:
    # The outer run (our CI sets CI=true) must not decide whether the inner run records snapshots.
    return inner_pytest_env(ci=ci)


class OtherServer(ManagedServer):
    """A test server of another stack or dialect, started and made ready by the project's one launcher."""

    def __init__(self, workdir: Path, *defects: str, script: Path = OTHER_SERVER, family: str | None = None,
                 arch: str = "qwen3"):
        port = free_port()
        self.model = f"other-{arch}"
        argv = [sys.executable, str(script), "--port", str(port), "--model-dir", self.model,
                "--storage-dir", str(workdir / f"storage-{port}")]
        if arch != "qwen3":
            argv += ["--arch", arch]
        for defect in defects:
            argv += ["--defect", defect]
        if family:
            argv += ["--family", family]
        super().__init__(argv, port, workdir, startup_timeout_s=120, log_file=workdir / f"server-{port}.log",
                         cwd=workdir,  # where it lays out its model: the harness finds its config.json there
                         env={"PYTHONPATH": str(OTHER_SERVER.parent)})  # the interventions server imports the engine
        self.start()
        self.wait_ready()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("other-stack")


def conformance(workdir: Path, port: int, *args: str, ci: bool = False, report: str = "report"):
    report_dir = workdir / report
    argv = [sys.executable, "-m", "capture_conformance.harness.pytest_plugin.cli", "--host", "127.0.0.1", "--port", str(port), "--report-dir",
            str(report_dir), *args]
    result = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=300, env=_env(ci))
    path = report_dir / "conformance-report.json"
    assert path.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(path.read_text())


def _outcomes(report: dict) -> dict[str, str]:
    return {t["nodeid"].split("::", 1)[-1]: t["outcome"] for t in report["tests"]}


def _failures(report: dict) -> list[str]:
    return [f"{t['nodeid'].split('::', 1)[-1]}: {t['outcome']}: {(t.get('message') or '').splitlines()[:1]}"
            for t in report["tests"] if t["outcome"] in ("failed", "error")]


def _true_sizes(model_dir: Path) -> dict:
    """The model's sizes through transformers' own names (GPT-2's n_embd answers as hidden_size)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers}


# family, profile, and whether the snapshots it recorded are then compared (and missing in a CI run): the full
# profile and the regression round on GPT-2 (the family of the issue), the core profile on the others; Gemma
# (tied head, scaled embeddings, one KV head) and Mistral in the matrix tier, which holds whole runs per case.
ARCH_RUNS = [
    pytest.param("gpt2", "full", True, id="gpt2"),
    pytest.param("qwen3", "core", False, id="qwen3"),
    pytest.param("llama", "core", False, id="llama"),
    pytest.param("neox", "core", False, id="neox"),
    pytest.param("opt", "core", False, id="opt"),
    pytest.param("phi3", "core", False, id="phi3"),
    pytest.param("gemma", "core", False, id="gemma", marks=pytest.mark.matrix),
    pytest.param("mistral", "core", False, id="mistral", marks=pytest.mark.matrix),
    pytest.param("neox-japanese", "core", False, id="neox-japanese", marks=pytest.mark.matrix),
]
SNAPSHOTS = 4  # shape snapshots the core and full profiles record


@pytest.mark.parametrize(("arch", "profile", "regression"), ARCH_RUNS)
def test_a_correct_server_on_another_stack_passes_on_its_first_run_and_its_snapshots_are_then_regression(
        workdir, arch, profile, regression):
    server = OtherServer(workdir, arch=arch)
    model = server.model
    try:
        first, report = conformance(workdir, server.port, "--profile", profile, report=f"report-{arch}")
        output = first.stdout + first.stderr
        assert first.returncode == 0 and report["passed"], "\n".join(_failures(report)) + "\n" + output[-3000:]
        assert report["capture_level"] == "full" and report["diagnoses"] == [], report["diagnoses"]
        truth = report["ground_truth"]
        assert report["model"] == model and truth["vocab_size"] != 151936, truth
        sizes = _true_sizes(workdir / model)
        assert {k: truth[k] for k in sizes} == sizes, (truth, sizes)  # learnt from the model, whatever its names
        snaps = report["snapshots"]
        assert len(snaps["recorded"]) == SNAPSHOTS and not snaps["compared"], snaps
        assert snaps["dirs"] == [str(workdir / "capture-snapshots" / model)], snaps
        assert f"shape snapshots: {SNAPSHOTS} recorded in" in first.stdout, first.stdout[-3000:]
        # random-weight text (no spaces, U+FFFD in it) still gets a stop string the server can honour
        outcomes = _outcomes(report)
        assert outcomes["test_stop_string_ends_the_completion_before_it"] == "passed", outcomes
        assert outcomes["test_early_end_of_sequence_ends_the_capture_too"] == "passed", outcomes
        # Every area ran, the positions area included: it declares prompt and sequence (protocol 1.1), so no
        # positions test may skip, whatever the family calls its modules.
        positions = {t["nodeid"]: t["outcome"] for t in report["tests"] if "test_positions.py" in t["nodeid"]}
        assert len(positions) >= 5 and set(positions.values()) == {"passed"}, positions
        if not regression:
            return

        second, report = conformance(workdir, server.port, "--profile", profile, "--", "-k", "snapshot",
                                     report=f"second-{arch}")
        assert second.returncode == 0, second.stdout[-3000:]
        assert len(report["snapshots"]["compared"]) == SNAPSHOTS and not report["snapshots"]["recorded"], \
            report["snapshots"]

        ci, report = conformance(workdir, server.port, "--profile", profile, "--ci", "--snapshot-dir",
                                 str(workdir / f"no-set-here-{arch}"), "--", "-k", "snapshot", report=f"ci-{arch}")
        assert ci.returncode == 1 and not report["passed"], ci.stdout[-3000:]
        (cause,) = report["diagnoses"]
        assert cause["cause"] == "no shape snapshot set (CI run)" and cause["count"] == SNAPSHOTS, cause
        assert not (workdir / f"no-set-here-{arch}").exists()
    finally:
        server.stop()


OLDER = "store_activations"  # the older family: no completion_token_ids, activation_run_id or url
NEVER_IN_OLDER = ["completion_token_ids", "activation_run_id", "'url'", "no url"]
# defects, extra CLI arguments, the causes the diagnoses must list first (in order), messages that must not appear
DEFECT_CASES = {
    "4-D logits, older family": ([OLDER, "four_d_logits"], ["--profile", "smoke"],
                                 ["extra dimensions: the capture has a size-1 dimension too many"],
                                 ["single-token capture only", *NEVER_IN_OLDER]),
    "truncated files, older family": ([OLDER, "truncated_file"], ["--profile", "smoke"],
                                      ["truncated file: the stored tensor keeps fewer features than its metadata says"],
                                      NEVER_IN_OLDER),
    "re-tokenised usage": (["retokenised_usage"], ["--", "-k", "test_chat or test_multi_token"],
                           ["usage counts a re-tokenisation of the reply"], ["max_tokens=8 on a story prompt gave"]),
    "zero usage, no load route": (["zero_usage", "no_load_route"], ["--", "-k", "test_chat or test_models"],
                                  ["missing from protocol v1: POST /models/load", "usage counts nothing (zeros)"],
                                  ["gave 0 tokens"]),
    "list of steps, 500 on bad input, older family": ([OLDER, "list_of_steps", "bad_input_500"],
                                        ["--", "-k", "test_bad_input or test_multi_token"],
                                        ["a client mistake is answered 500, not 4xx",
                                         "POST /v1/chat/completions answers 500 (a server error)"], NEVER_IN_OLDER),
}


@pytest.mark.parametrize("case", list(DEFECT_CASES))
def test_the_report_names_each_defect_first(workdir, case):
    defects, args, causes, never = DEFECT_CASES[case]
    family = OLDER if OLDER in defects else None
    defects = [d for d in defects if d != OLDER]
    server = OtherServer(workdir, *defects, family=family)
    try:
        result, report = conformance(workdir, server.port, *args, report=f"report-{'-'.join(defects)}")
    finally:
        server.stop()
    assert result.returncode == 1 and not report["passed"], result.stdout[-3000:]
    assert report["dialect"] == (family or "protocol-v1"), report["dialect"]
    listed = [d["cause"] for d in report["diagnoses"]]
    assert listed[: len(causes)] == causes, listed
    messages = " ".join(t["message"] for t in report["tests"])
    for text in never:
        assert text not in messages, f"{text!r} in the messages: {messages[:3000]}"
    table = result.stdout[result.stdout.index("diagnoses (root causes"):]
    assert causes[0][:60] in table.splitlines()[1], table
    if "no_load_route" in defects:
        (missing,) = report["missing_from_protocol_v1"]
        assert missing["feature"] == "POST /models/load" and "404" in missing["why"], missing
        outcomes = _outcomes(report)
        failed_load = [k for k in outcomes if k.startswith("test_failed_load_is_4xx")]
        assert failed_load and all(outcomes[k] == "skipped" for k in failed_load), outcomes  # never a pass
    if "bad_input_500" in defects:
        bad = report["areas"]["bad_input"]
        # the area does not hang on a successful capture: only the cases about a real run's files need one
        # (the older family has no `capture` object: those 12 cases are listed as missing, not failed)
        assert bad["passed"] >= 15 and bad["failed"] + bad["errors"] <= 5, bad
        outcomes = _outcomes(report)
        assert outcomes["test_bad_input_is_a_client_error_and_the_server_carries_on[max-tokens-zero]"] == "failed"
        html = (workdir / f"report-{'-'.join(defects)}" / "conformance-report.html").read_text()
        assert "Diagnoses (root causes, most basic first)" in html and "a client mistake is answered 500" in html


def test_an_interventions_dialect_server_gets_a_full_report_naming_its_defects(workdir):
    server = OtherServer(workdir, script=INTERVENTIONS_SERVER)
    try:
        result, report = conformance(workdir, server.port, report="report-interventions")
    finally:
        server.stop()
    assert result.returncode == 1 and report["dialect"] == "interventions", result.stdout[-3000:]
    assert "dialect interventions" in result.stdout
    causes = [d["cause"] for d in report["diagnoses"]]
    for defect in ("a client mistake is answered 500, not 4xx",  # max_tokens: 0
                   "a client mistake is answered 2xx by POST /v1/chat/completions",  # an unknown model served
                   "one-chunk streaming: the stream is not token by token",
                   "prompt-only capture: no generated position captured",
                   "truncated last dimension (features cut)"):  # saved_shape cut by sample_hidden
        assert defect in causes, causes
    assert causes.index("prompt-only capture: no generated position captured") < causes.index(
        "one-chunk streaming: the stream is not token by token"), causes  # the capture defect is the more basic
    missing = {m["feature"]: m for m in report["missing_from_protocol_v1"]}
    assert {"per-request capture", "POST /models/load", "/health 'protocol'"} <= set(missing), missing
    assert missing["per-request capture"]["tests"] > 30, missing  # one line for every capture test
    # what runs without capture still ran: the plain chat contract and most of bad_input
    assert report["areas"]["chat"]["passed"] >= 10 and report["areas"]["bad_input"]["passed"] >= 8, report["areas"]
    messages = " ".join(t["message"] for t in report["tests"] if t["outcome"] in ("failed", "error"))
    for field in ("completion_token_ids", "activation_run_id", "'url'", "activations_meta"):
        assert field not in messages, f"a message blames {field}, which this dialect never had: {messages[:3000]}"


# The older family's files (no url: read at file_path) and its greedy logits (no ids: their argmax stands in).
OLDER_FILE_CHECKS = ["--", "-k", "test_store_activations_logits_match_the_reference or test_default_capture_is_float32_pt"]


def _by_test(report: dict) -> dict[str, dict]:
    return {t["nodeid"].split("::", 1)[-1]: t for t in report["tests"]}


# The default tier runs the defect (its file check passes, its values fail); the matrix the clean and remote cases.
@pytest.mark.parametrize("defect", [pytest.param(None, marks=pytest.mark.matrix, id="correct"), "probability_logits",
                                    pytest.param("files_elsewhere", marks=pytest.mark.matrix)])
def test_older_family_files_are_read_at_file_path_and_greedy_logits_are_value_checked_by_their_argmax(workdir, defect):
    server = OtherServer(workdir, *([defect] if defect else []), family=OLDER)
    try:
        result, report = conformance(workdir, server.port, *OLDER_FILE_CHECKS, report=f"report-older-{defect}")
    finally:
        server.stop()
    assert report["dialect"] == OLDER, report["dialect"]
    tests = _by_test(report)
    values, files = tests["test_store_activations_logits_match_the_reference"], tests["test_default_capture_is_float32_pt"]
    if defect is None:  # the file checked against its metadata, the logits against the reference: both pass
        assert result.returncode == 0 and report["passed"], _failures(report)
        assert values["outcome"] == files["outcome"] == "passed", (values, files)
    elif defect == "probability_logits":  # same argmax, same shape: only the values, through the argmax ids, see it
        assert result.returncode == 1 and files["outcome"] == "passed", (values, files)
        assert values["outcome"] == "failed" and "probabilities (softmax), not logits" in values["message"], values
    else:  # a remote server's paths: said once, as what the dialect cannot give here, never as a defect
        assert values["outcome"] == files["outcome"] == "skipped", (values, files)
        assert report["missing_from_protocol_v1"] == [
            {"feature": "file not reachable from here", "why": f"{OLDER} dialect", "tests": 2}], report
        said = "missing from protocol v1: file not reachable from here (2 tests skipped)"
        assert result.stdout.count(said) == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    for text in NEVER_IN_OLDER:
        assert text not in values["message"] + files["message"], (text, values, files)
