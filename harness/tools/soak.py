"""A soak of a capture server: client threads sending a mix of valid and invalid requests.

Short form in CI (``tests/test_soak.py``), long form as a script::

    python -m capture_conformance.harness.tools.soak --url http://127.0.0.1:8006 --requests 5000 --threads 8 \
        [--storage-dir DIR] [--pid PID]

Checks, after the load: no 5xx for any request; every valid response keeps the
shape contract; every kept run's files exist and match their metadata; the
number of runs on disk equals successful captures minus deletions (when the
storage directory is given); resident memory of the server (when its pid is
given) before and after. Loops are bounded by the request count and stop by
themselves. Only loopback or the user's own hosts should ever be targeted.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from capture_conformance.fixtures.tiny_model import TINY_MODEL_ID
from capture_conformance.harness.protocol.checks import expect_tensor_matches_meta, expect_token_counts
from capture_conformance.harness.protocol.client import DEFAULT_PORT, CaptureClient, chat_body
from capture_conformance.harness.protocol.layout import Layout
from capture_conformance.harness.protocol.responses import Completion
from capture_conformance.harness.protocol.runs import CaptureRuns
from capture_conformance.harness.tools import help_text
from capture_conformance.harness.tools.savepoints import model_layout

PROMPTS = [
    "Tell me a short story about a fox.",
    "Ben had 40 coins and gave away 12. How many coins are left?",
    "Say OK.",
    "Count to three.",
]
_RUN_DIR = re.compile(r"^[0-9a-f]{32}$")


def _valid_capture(rng: random.Random, layout: Layout) -> dict:
    """A random valid capture over the model's own (discovered) block stack and head."""
    savepoints = rng.choice([
        None,
        ["logits"],
        [{"name": "h", "selector": layout.block(rng.randrange(layout.num_blocks))},
         {"name": "logits", "selector": "logits"}],
        [layout.block_dotted(layout.last), layout.block(0, io="input")],
    ])
    capture = {"tokens": rng.choice(["all", "first", "last"]), "dtype": rng.choice(["float32", "bfloat16", "float16"]),
               "format": rng.choice(["pt", "safetensors"])}
    if savepoints:
        capture["savepoints"] = savepoints
    return capture


INVALID = [
    ("unknown selector", {"capture": {"savepoints": ["no_such_module"]}}),
    ("code selector", {"capture": {"savepoints": ["__import__('os')"]}}),
    ("bad dtype", {"capture": {"dtype": "float8"}}),
    ("n=2", {"n": 2}),
    ("max_tokens 0", {"max_tokens": 0}),
    ("unknown model", {"model": "no-such-model"}),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}),
]


@dataclass
class SoakResult:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    contract_violations: list[str] = field(default_factory=list)
    captures: int = 0
    deleted: int = 0
    kept_runs: dict[str, Completion] = field(default_factory=dict)
    files_checked: int = 0
    file_problems: list[str] = field(default_factory=list)
    runs_on_disk: int | None = None
    rss_mb_before: float | None = None
    rss_mb_after: float | None = None
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> dict:
        by_class = Counter()
        for status, n in self.statuses.items():
            by_class[f"{status // 100}xx"] += n
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 1),
            "by_status": dict(sorted(self.statuses.items())),
            "by_class": dict(sorted(by_class.items())),
            "captures": self.captures,
            "deleted": self.deleted,
            "files_checked": self.files_checked,
            "file_problems": self.file_problems[:10],
            "contract_violations": self.contract_violations[:10],
            "runs_on_disk": self.runs_on_disk,
            "runs_expected": self.captures - self.deleted,
            "rss_mb_before": self.rss_mb_before,
            "rss_mb_after": self.rss_mb_after,
        }


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def discover_soak_layout(url: str, model: str, api_key: str | None = None) -> Layout:
    """The model's savepoints: from its local copy, else from the server's ``capture.savepoints``."""
    return model_layout(model, CaptureClient(url, api_key=api_key, timeout_s=30))


def run_soak(url: str, total: int = 300, threads: int = 8, model: str = TINY_MODEL_ID, layout: Layout | None = None,
             storage_dir: Path | None = None, pid: int | None = None, seed: int = 0, timeout: float = 120,
             api_key: str | None = None) -> SoakResult:
    result = SoakResult()
    layout = layout or discover_soak_layout(url, model, api_key)
    lock = threading.Lock()
    local = threading.local()

    def client() -> CaptureClient:
        # One client (one keep-alive session) per thread: a requests.Session is not shared across threads.
        if not hasattr(local, "client"):
            local.client = CaptureClient(url, api_key=api_key, timeout_s=timeout)
        return local.client

    def one(index: int) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        body = chat_body(model, rng.choice(PROMPTS), rng.randint(1, 8))
        kind = rng.random()
        if kind < 0.2:
            label, change = rng.choice(INVALID)
            body.update(change)
        elif kind < 0.25:
            label = "malformed json"
        else:
            label = "valid"
            if rng.random() < 0.85:
                body["capture"] = _valid_capture(rng, layout)
            if rng.random() < 0.2:
                body.update(temperature=0.8, top_p=0.9, seed=index)
        if label == "malformed json":
            answer = client().request("POST", "/v1/chat/completions", data=b'{"model": ',
                                      headers={"content-type": "application/json"})
        else:
            answer = client().post("/v1/chat/completions", body)
        problems, completion, delete = [], None, None
        if label == "valid" and answer.status == 200:
            completion = Completion(answer.json_object(), body)
            problems = _check_contract(completion)
        elif label == "valid":
            problems = [f"valid request answered {answer.describe()}"]
        elif not 400 <= answer.status < 500:
            problems = [f"{label}: answered {answer.status}, not 4xx"]
        captured = completion is not None and "activation_run_id" in completion.body and not problems
        if captured and rng.random() < 0.3:
            delete = client().delete(f"/v1/activations/{completion.run_id}")
        with lock:
            result.requests += 1
            result.statuses[answer.status] += 1
            result.contract_violations.extend(problems)
            if captured:
                result.captures += 1
                if delete is not None:
                    result.statuses[delete.status] += 1
                    result.requests += 1
                    if delete.status == 204:
                        result.deleted += 1
                    else:
                        result.contract_violations.append(f"delete answered {delete.status}")
                else:
                    result.kept_runs[completion.run_id] = completion

    started = time.monotonic()
    result.rss_mb_before = _rss_mb(pid)
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(one, i) for i in range(total)]:
            future.result()
    result.seconds = time.monotonic() - started
    result.rss_mb_after = _rss_mb(pid)
    _check_files(CaptureClient(url, api_key=api_key, timeout_s=timeout), model, result)
    if storage_dir is not None:
        result.runs_on_disk = sum(1 for p in Path(storage_dir).iterdir() if _RUN_DIR.match(p.name))
    return result


def _check_contract(completion: Completion) -> list[str]:
    """The library's views and checks; a broken field or contract is one problem, named."""
    try:
        captured = "activations_meta" in completion.body
        n = expect_token_counts(completion) if captured else completion.usage.completion_tokens
        max_tokens = completion.request["max_tokens"]
        if not 1 <= n <= max_tokens:
            return [f"completion_tokens {n} outside 1..{max_tokens}"]
        if captured:
            for name, meta in completion.meta.items():
                steps = n if meta.tokens == "all" else 1
                if meta.shape[:2] != [1, steps]:
                    return [f"{name}: shape {meta.shape} for {n} tokens, tokens={meta.tokens}"]
    except AssertionError as problem:  # ServerFault is one too
        return [str(problem)]
    return []


def _check_files(client: CaptureClient, model: str, result: SoakResult) -> None:
    """Every kept run's files download and hold what their metadata says."""
    for run_id, completion in result.kept_runs.items():
        runs = CaptureRuns(client, model)  # fresh per run: its file cache must not hold the whole soak
        for name, meta in completion.meta.items():
            result.files_checked += 1
            try:
                expect_tensor_matches_meta(runs.tensor(completion, name), meta)
            except AssertionError as problem:
                result.file_problems.append(f"{run_id}/{name}: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capture_conformance.harness.tools.soak", description=help_text.summary(__doc__))
    parser.add_argument("--url", required=True, help=f"base URL of the server, e.g. http://127.0.0.1:{DEFAULT_PORT}")
    parser.add_argument("--requests", type=int, default=2000, help="requests in all (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=8, help="requests in flight (default: %(default)s)")
    parser.add_argument("--model", default=TINY_MODEL_ID, help="model id on the server (default: %(default)s)")
    parser.add_argument("--storage-dir", type=Path, help="the server's storage directory, to count runs on disk")
    parser.add_argument("--pid", type=int, help="the server's pid, to read its resident memory")
    parser.add_argument("--api-key", help="the server's key, if it has one")
    args = parser.parse_args(argv)
    try:
        layout = discover_soak_layout(args.url, args.model, args.api_key)
    except LookupError as exc:
        print(f"soak: cannot tell the model's savepoints: {exc}", file=sys.stderr)
        return 2
    result = run_soak(args.url, args.requests, args.threads, args.model, layout, args.storage_dir, args.pid,
                      api_key=args.api_key)
    summary = result.summary()
    print(json.dumps(summary, indent=1))
    failed = result.server_errors or result.contract_violations or result.file_problems or (
        summary["runs_on_disk"] is not None and summary["runs_on_disk"] != summary["runs_expected"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
