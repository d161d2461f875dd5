"""The fault matrix: the conformance suites (profile ``core``) against each fault-injected reference server.

Used by ``tests/test_fault_matrix.py`` (one case per fault, plus the unfaulted
server), and as a command that renders ``docs/kill-rate.md`` from a real run::

    KILL_RATE_OUT=/tmp/kill-rate .venv/bin/python -m pytest tests/test_fault_matrix.py -n 2 -q
    .venv/bin/python -m tests.fault_matrix render /tmp/kill-rate > docs/kill-rate.md

Each case is one ``capture-conformance`` run in a subprocess (so no plugin state
leaks into the outer pytest run), against ``python tests/faulty_server.py --fault
NAME`` started by the harness on a free port, with the embedded tiny model.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest and faults beside this file, however it runs
from conftest import inner_pytest_env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
UNFAULTED = "none"
PROFILE = "core"
OUT_ENV = "KILL_RATE_OUT"
# One case is ~30-90 s of a shared 2-core machine; the limit is for a hung run, not a slow one.
CASE_TIMEOUT_S = 900


FAULTY_SERVER = Path(__file__).resolve().with_name("faulty_server.py")


def witness_area(area: str) -> str:
    """A cheap area that a faulty but running server passes: health, or models for a health fault."""
    return "models" if area == "health" else "health"


def launch_command(fault: str, model: str | None = None) -> str:
    """``fault``: one fault, ``none``, or several joined by ``+`` (installed together)."""
    served = f" --model {model}" if model else ""
    if fault == UNFAULTED:
        return "python -m capture_conformance.reference_server --port {port} --storage-dir {storage_dir}" + served
    faults = "".join(f" --fault {name}" for name in fault.split("+"))
    return f"python {FAULTY_SERVER} --port {{port}} --storage-dir {{storage_dir}}{faults}{served}"


def subprocess_env() -> dict[str, str]:
    """The inner runs' environment (``conftest.inner_pytest_env``: no outer pytest/xdist identity, hub offline,
    only the conformance plugins).

    Each case's server (and its torch) gets one intra-op thread: under ``-n 2`` two
    cases, each a server and a client, already share the two cores, and torch's
    default of one thread per core only makes them fight (the answers are the same).
    """
    return inner_pytest_env()


@dataclass
class Failure:
    test: str  # node id, e.g. suites/test_chat.py::test_usage_counts_the_generated_tokens
    area: str
    outcome: str  # failed or error
    message: str  # first line
    detail: str = ""  # the whole message (bounded), for cases that check what a diagnosis says

    def line(self) -> str:
        return f"[{self.area}] {self.test}: {self.message}"


@dataclass
class CaseResult:
    case: str
    area: str | None  # the fault's own area; None for the unfaulted server
    description: str
    exit_code: int
    report_found: bool
    report_passed: bool
    capture_level: str
    passed: int
    skipped: int
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    output_tail: str = ""
    machine: dict = field(default_factory=dict)

    @property
    def own_area_failures(self) -> list[Failure]:
        return [f for f in self.failures if f.area == self.area]

    @property
    def caught(self) -> bool:
        return self.exit_code != 0 and bool(self.failures)

    def failure_lines(self) -> str:
        return "\n".join("  " + f.line() for f in self.failures) or "  (no failing test)"

    def explain(self) -> str:
        """Everything an assertion message needs: the verdict, what failed and where, the run's tail."""
        head = (f"case {self.case!r}" + (f" (area {self.area}: {self.description})" if self.area else "")
                + f": capture-conformance exit {self.exit_code}, report "
                + (f"passed={self.report_passed}, capture level {self.capture_level}" if self.report_found
                   else "NOT written")
                + f", {self.passed} passed, {len(self.failures)} failed/errors, {self.skipped} skipped, "
                  f"{self.seconds:.0f} s")
        return f"{head}\nfailing tests:\n{self.failure_lines()}\noutput tail:\n{self.output_tail}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CaseResult":
        data = dict(data)
        data["failures"] = [Failure(**f) for f in data.get("failures", [])]
        return cls(**data)


def machine() -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "load_1min": round(os.getloadavg()[0], 2)}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - the matrix needs the server extra anyway
        pass
    return info


def run_case(case: str, workdir: Path, timeout: float = CASE_TIMEOUT_S, *, model: str | None = None,
             only: str | None = None) -> CaseResult:
    """One capture-conformance run (profile core) against the server with fault ``case`` (or none).

    ``model``: a built-in model other than the default (the zoo's families); ``only``: a ``-k``
    expression, for cases that need one test of the fault's area (and then no witness area).
    """
    from faults import FAULTS

    names = [] if case == UNFAULTED else case.split("+")
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault {unknown}")
    if len({FAULTS[n].area for n in names}) > 1:
        raise ValueError(f"faults installed together must share their area: {case}")
    fault = FAULTS[names[0]] if names else None
    report_dir = workdir / "report"
    argv = [sys.executable, "-m", "capture_conformance.harness.pytest_plugin.cli", "--launch", launch_command(case, model),
            "--profile", PROFILE, "--report-dir", str(report_dir)]
    if model:
        argv += ["--model", model]
    if only and fault is not None:
        argv += ["--area", fault.area, "--", "-k", only]
    elif fault is not None and fault.area != "health" and not os.environ.get(OUT_ENV):
        # Caught means one failure of its own area: stop there (-x). The witness area runs first (areas
        # run health first), so a crash is still told from a bug. The kill-rate page (KILL_RATE_OUT)
        # lists every test a fault fails, so that run goes to the end.
        argv += ["--area", f"{fault.area},{witness_area(fault.area)}", "--", "-x"]
    elif fault is not None:
        # The fault's own area, where it must be caught, and one more that a running server passes
        # (so a crash is told from a bug). The unfaulted case runs every area.
        argv += ["--area", f"{fault.area},{witness_area(fault.area)}"]
    started = time.time()
    try:
        proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                              env=subprocess_env())
        exit_code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        output = (out.decode(errors="replace") if isinstance(out, bytes) else out) + f"\n(timed out after {timeout} s)"
        exit_code = -9
    finished = time.time()
    report_path = report_dir / "conformance-report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    tests = report.get("tests", [])
    failures = [Failure(t["nodeid"], t["area"], t["outcome"], (t.get("message") or "").strip().split("\n")[0][:300],
                        (t.get("message") or "")[:4000])
                for t in tests if t["outcome"] in ("failed", "error")]
    return CaseResult(
        case=case,
        area=fault.area if fault else None,
        description=fault.description if fault else "the unfaulted reference server",
        exit_code=exit_code,
        report_found=bool(report),
        report_passed=bool(report.get("passed")),
        capture_level=report.get("capture_level", "none"),
        passed=sum(t["outcome"] == "passed" for t in tests),
        skipped=sum(t["outcome"] == "skipped" for t in tests),
        failures=failures,
        seconds=round(finished - started, 1),
        started_at=started,
        finished_at=finished,
        output_tail=output[-3000:],
        machine=machine(),
    )


def save(result: CaseResult, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{result.case}.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return path


# -- docs/kill-rate.md ------------------------------------------------------------------------------------


def _short(nodeid: str) -> str:
    return nodeid.split("::", 1)[-1]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(directory: Path) -> str:
    from faults import FAULTS

    results = {r.case: r for r in (CaseResult.from_json(json.loads(p.read_text()))
                                    for p in sorted(directory.glob("*.json")))}
    missing = [name for name in [UNFAULTED, *FAULTS] if name not in results]
    faults = [results[name] for name in FAULTS if name in results]
    caught = [r for r in faults if r.caught]
    own = [r for r in faults if r.caught and r.own_area_failures]
    base = results.get(UNFAULTED)
    everything = list(results.values())
    wall = (max(r.finished_at for r in everything) - min(r.started_at for r in everything)) if everything else 0
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(min((r.started_at for r in everything), default=0)))
    m = everything[0].machine if everything else {}
    loads = [r.machine["load_1min"] for r in everything if "load_1min" in r.machine]

    lines = [
        "# Kill rate: the conformance suites against fault-injected servers",
        "",
        "Generated by `tests/fault_matrix.py` from a real run of `tests/test_fault_matrix.py`: for each fault",
        "in `tests/faults.py`, `capture-conformance --profile core --area AREA,health` against",
        "`python tests/faulty_server.py --fault NAME` (the embedded `tiny-qwen3` model, CPU), where AREA is the",
        "fault's own area (the suite module that must catch it) and `health` a witness that the faulty server",
        "runs (`models` for a health fault), and once against the unfaulted server with every area. A fault",
        "is *caught* when its own area fails; the unfaulted run shows that every area passes a correct server.",
        "Each case's server and client run with `OMP_NUM_THREADS=1` (two cases share two cores under",
        "`-n 2`; torch's default of a thread per core doubled each case's CPU time).",
        "",
        f"- **Kill rate: {len(caught)}/{len(faults)} faults caught"
        + (f" ({100 * len(caught) / len(faults):.0f} %)" if faults else "") + "**;"
        f" caught in their own area: {len(own)}/{len(faults)}.",
    ]
    if base is not None:
        verdict = "passed" if base.report_passed and base.exit_code == 0 and not base.failures else "FAILED"
        lines.append(f"- Unfaulted server: {verdict} — {base.passed} passed, {len(base.failures)} failed, "
                     f"{base.skipped} skipped, capture level `{base.capture_level}`, {base.seconds:.0f} s.")
    else:
        lines.append("- Unfaulted server: not in this run.")
    if missing:
        lines.append(f"- **Not in this run:** {', '.join(missing)}.")
    lines += [
        f"- Run: {when} on `{m.get('platform', '?')}`, {m.get('cpus', '?')} CPUs, Python {m.get('python', '?')}, "
        f"torch {m.get('torch', '?')}; {len(everything)} cases under `pytest -n 2`, {wall / 60:.1f} min wall "
        f"clock for the matrix (cases {min((r.seconds for r in everything), default=0):.0f}–"
        f"{max((r.seconds for r in everything), default=0):.0f} s each)"
        + (f"; 1-minute load average at the cases' ends {min(loads):.1f}–{max(loads):.1f} (the machine's "
           f"other work included)" if loads else "") + ".",
        "",
        "| fault | area | description | caught by (own area) | passed | s |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in faults:
        mine = r.own_area_failures
        by = "<br>".join(f"`{_short(f.test)}`" for f in mine) if mine else (
            "**not caught in its own area**" if r.caught else "**NOT CAUGHT**")
        lines.append(f"| `{r.case}` | {r.area} | {_cell(r.description)} | {by} | {r.passed} | {r.seconds:.0f} |")
    lines += ["", "## What each fault's own area said", "",
              "The first own-area failure of each fault, first line of its message.", ""]
    for r in faults:
        mine = r.own_area_failures
        if mine:
            lines.append(f"- `{r.case}` — `{_short(mine[0].test)}`: {_cell(mine[0].message)[:240]}")
        else:
            lines.append(f"- `{r.case}` — nothing in `{r.area}` failed.")
    lines += [
        "",
        "## Rerunning it",
        "",
        "```bash",
        "# the matrix alone (`make matrix` runs it with the zoo's families; CI after `make test`); each case",
        "# writes its result as JSON",
        "KILL_RATE_OUT=/tmp/kill-rate .venv/bin/python -m pytest tests/test_fault_matrix.py -n 2 -q",
        "# this page, from those results",
        ".venv/bin/python -m tests.fault_matrix render /tmp/kill-rate > docs/kill-rate.md",
        "# one faulty server by hand",
        "capture-conformance --area multi_token --launch \"python tests/faulty_server.py --port {port} "
        "--storage-dir {storage_dir} --fault first_step_only\"",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "render":
        sys.stdout.write(render(Path(argv[1])))
        return 0
    if len(argv) in (1, 2) and argv[0] == "run":  # one case by hand: python -m tests.fault_matrix run FAULT
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
            result = run_case(argv[1] if len(argv) == 2 else UNFAULTED, Path(tmp))
        print(result.explain())
        return 0
    print("usage: python -m tests.fault_matrix render DIR  |  run [FAULT]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
