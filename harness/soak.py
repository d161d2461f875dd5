"""A soak of a capture server: client threads sending a mix of valid and invalid requests.

Short form in CI (``tests/test_soak.py``), long form as a script::

    python -m harness.soak --url http://127.0.0.1:8006 --requests 5000 --threads 8 \
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
import io
import json
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

PROMPTS = [
    "Tell me a short story about a fox.",
    "Ben had 40 coins and gave away 12. How many coins are left?",
    "Say OK.",
    "Count to three.",
]
_RUN_DIR = re.compile(r"^[0-9a-f]{32}$")


def _valid_capture(rng: random.Random, layers: int) -> dict:
    savepoints = rng.choice([
        None,
        ["lm_head"],
        [{"name": "h", "selector": f"model.layers[{rng.randrange(layers)}]"}, {"name": "logits", "selector": "lm_head"}],
        [f"model.layers.{layers - 1}", "model.layers[0].input"],
    ])
    capture = {"tokens": rng.choice(["all", "first", "last"]), "dtype": rng.choice(["float32", "bfloat16", "float16"]),
               "format": rng.choice(["pt", "safetensors"])}
    if savepoints:
        capture["savepoints"] = savepoints
    return capture


INVALID = [
    ("unknown selector", {"capture": {"savepoints": ["model.nope"]}}),
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
    kept_runs: dict[str, dict] = field(default_factory=dict)
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


def run_soak(url: str, total: int = 300, threads: int = 8, model: str = "tiny-qwen3", layers: int = 2,
             storage_dir: Path | None = None, pid: int | None = None, seed: int = 0, timeout: float = 120,
             headers: dict | None = None) -> SoakResult:
    result = SoakResult()
    lock = threading.Lock()
    session_local = threading.local()

    def session() -> requests.Session:
        if not hasattr(session_local, "s"):
            session_local.s = requests.Session()
            session_local.s.headers.update(headers or {})
        return session_local.s

    def one(index: int) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": rng.randint(1, 8), "temperature": 0}
        kind = rng.random()
        if kind < 0.2:
            label, change = rng.choice(INVALID)
            body.update(change)
        elif kind < 0.25:
            label = "malformed json"
        else:
            label = "valid"
            if rng.random() < 0.85:
                body["capture"] = _valid_capture(rng, layers)
            if rng.random() < 0.2:
                body.update(temperature=0.8, top_p=0.9, seed=index)
        if label == "malformed json":
            response = session().post(url + "/v1/chat/completions", data=b'{"model": ', timeout=timeout,
                                      headers={"content-type": "application/json"})
        else:
            response = session().post(url + "/v1/chat/completions", json=body, timeout=timeout)
        problems = []
        if label == "valid" and response.status_code == 200:
            problems = _check_contract(response.json(), body)
        elif label == "valid":
            problems = [f"valid request answered {response.status_code}: {response.text[:200]}"]
        elif not 400 <= response.status_code < 500:
            problems = [f"{label}: answered {response.status_code}, not 4xx"]
        delete = None
        if label == "valid" and response.status_code == 200 and "activation_run_id" in response.json():
            data = response.json()
            if rng.random() < 0.3:
                delete = session().delete(f"{url}/v1/activations/{data['activation_run_id']}", timeout=timeout)
        with lock:
            result.requests += 1
            result.statuses[response.status_code] += 1
            result.contract_violations.extend(problems)
            if label == "valid" and response.status_code == 200 and "activation_run_id" in response.json():
                data = response.json()
                result.captures += 1
                if delete is not None:
                    result.statuses[delete.status_code] += 1
                    result.requests += 1
                    if delete.status_code == 204:
                        result.deleted += 1
                    else:
                        result.contract_violations.append(f"delete answered {delete.status_code}")
                else:
                    result.kept_runs[data["activation_run_id"]] = data["activations_meta"]

    started = time.monotonic()
    result.rss_mb_before = _rss_mb(pid)
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(one, i) for i in range(total)]:
            future.result()
    result.seconds = time.monotonic() - started
    result.rss_mb_after = _rss_mb(pid)
    _check_files(url, result, timeout, headers or {})
    if storage_dir is not None:
        result.runs_on_disk = sum(1 for p in Path(storage_dir).iterdir() if _RUN_DIR.match(p.name))
    return result


def _check_contract(data: dict, body: dict) -> list[str]:
    problems = []
    n = data["usage"]["completion_tokens"]
    if not 1 <= n <= body["max_tokens"]:
        problems.append(f"completion_tokens {n} outside 1..{body['max_tokens']}")
    if "activations_meta" in data:
        if len(data["completion_token_ids"]) != n:
            problems.append(f"{len(data['completion_token_ids'])} ids for {n} tokens")
        for name, meta in data["activations_meta"].items():
            steps = n if meta["tokens"] == "all" else 1
            if meta["shape"][:2] != [1, steps]:
                problems.append(f"{name}: shape {meta['shape']} for {n} tokens, tokens={meta['tokens']}")
    return problems


def _check_files(url: str, result: SoakResult, timeout: float, headers: dict) -> None:
    import torch
    from safetensors.torch import load as load_safetensors

    for run_id, metas in result.kept_runs.items():
        for name, meta in metas.items():
            response = requests.get(url + meta["url"], timeout=timeout, headers=headers)
            result.files_checked += 1
            if response.status_code != 200:
                result.file_problems.append(f"{run_id}/{name}: download answered {response.status_code}")
                continue
            if meta["format"] == "safetensors":
                tensor = load_safetensors(response.content).get(name)
            else:
                tensor = torch.load(io.BytesIO(response.content), weights_only=True)
            if tensor is None or list(tensor.shape) != meta["shape"] or str(tensor.dtype) != meta["dtype"] \
                    or tensor.numel() != meta["numel"]:
                result.file_problems.append(f"{run_id}/{name}: file does not match its metadata")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8006")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the model (for layer selectors)")
    parser.add_argument("--storage-dir", type=Path, help="the server's storage directory, to count runs on disk")
    parser.add_argument("--pid", type=int, help="the server's pid, to read its resident memory")
    parser.add_argument("--api-key")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    result = run_soak(args.url, args.requests, args.threads, args.model, args.layers, args.storage_dir, args.pid,
                      headers=headers)
    summary = result.summary()
    print(json.dumps(summary, indent=1))
    failed = result.server_errors or result.contract_violations or result.file_problems or (
        summary["runs_on_disk"] is not None and summary["runs_on_disk"] != summary["runs_expected"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
