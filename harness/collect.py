"""``capture-collect``: run a GSM8K-style problem set through a capture server and keep the activations.

Each problem (JSONL with ``question`` and ``answer`` ending in ``#### <number>``,
optionally ``id``) is sent through chat with capture; the completion, the
extracted answer, whether it is correct, and the activation files (downloaded
into the output directory, or only their server paths with ``--no-download``)
go into ``manifest.jsonl``, one line per problem, appended and flushed as each
one finishes. ``--resume`` skips the ids already there, so an interrupted run
picks up where it stopped without redoing work.

    capture-collect --input fixtures/gsm8k_sample.jsonl --out runs/gsm \\
        --savepoints lm_head model.layers[0] [--host H --port P] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .client import CaptureClient, ServerFault
from .tensors import size_cap

DEFAULT_TEMPLATE = "{question}\nSolve the problem step by step and end with '#### <answer>'."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """``"$1,200.50"`` -> ``"1200.5"``; None when ``text`` holds no number."""
    match = _NUMBER.search(text.replace("$", ""))
    if not match:
        return None
    raw = match.group(0).replace(",", "").rstrip(".")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    normalized = format(value.normalize(), "f")
    return normalized.rstrip("0").rstrip(".") if "." in normalized else normalized


def extract_answer(text: str) -> str | None:
    """The GSM8K rule: the number after the last ``####``, else the last number in the text."""
    if "####" in text:
        found = normalize_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    numbers = _NUMBER.findall(text.replace("$", ""))
    return normalize_number(numbers[-1]) if numbers else None


def read_problems(path: Path) -> list[dict]:
    problems = []
    with path.open() as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise SystemExit(f"{path}:{index + 1}: a problem needs 'question' and 'answer'")
            row.setdefault("id", f"line-{index + 1:06d}")
            row["id"] = str(row["id"])
            problems.append(row)
    return problems


def done_ids(manifest: Path) -> set[str]:
    if not manifest.exists():
        return set()
    ids = set()
    with manifest.open() as f:
        for line in f:
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                continue  # a line cut short by an interruption: that problem is redone
    return ids


def _safe_component(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:120] or "_"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def parse_savepoints(values: list[str]) -> list:
    """``name=selector`` or a bare selector."""
    out = []
    for value in values:
        name, sep, selector = value.partition("=")
        out.append({"name": name, "selector": selector} if sep else value)
    return out


def collect_one(client: CaptureClient, problem: dict, args, files_dir: Path) -> dict:
    prompt = args.prompt_template.format(question=problem["question"])
    capture = {"tokens": args.tokens, "dtype": args.dtype, "format": args.format}
    if args.savepoints:
        capture["savepoints"] = parse_savepoints(args.savepoints)
    body = client.chat(args.model, prompt, args.max_tokens, capture=capture).expect_status(200).json_object()
    completion = body["choices"][0]["message"]["content"]
    extracted = extract_answer(completion)
    gold = extract_answer(problem["answer"])
    activations = {}
    run_dir = files_dir / _safe_component(problem["id"])
    for name, meta in body.get("activations_meta", {}).items():
        entry = {"shape": meta["shape"], "dtype": meta["dtype"], "server_path": meta.get("file_path"), "url": meta.get("url")}
        if args.download:
            data = client.download(meta["url"], max_bytes=size_cap(int(meta["numel"]), meta["dtype"]), what=name)
            run_dir.mkdir(parents=True, exist_ok=True)
            local = run_dir / f"{_safe_component(name)}.{meta.get('format', args.format)}"
            _write_atomically(local, data)
            entry["file"] = str(local.relative_to(files_dir.parent))
        activations[name] = entry
    if args.download and args.delete_remote and body.get("activation_run_id"):
        client.delete(f"/v1/activations/{body['activation_run_id']}")
    return {
        "id": problem["id"],
        "prompt": prompt,
        "completion": completion,
        "completion_token_ids": body.get("completion_token_ids"),
        "usage": body.get("usage"),
        "extracted_answer": extracted,
        "gold_answer": gold,
        "correct": extracted is not None and extracted == gold,
        "activation_run_id": body.get("activation_run_id"),
        "activations": activations,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capture-collect", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="problems, JSONL: question, answer[, id]")
    parser.add_argument("--out", type=Path, required=True, help="output directory (manifest.jsonl, files/)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8006)
    parser.add_argument("--url", help="base URL; overrides --host/--port")
    parser.add_argument("--api-key", default=os.environ.get("CAPTURE_API_KEY"))
    parser.add_argument("--model", default="tiny-qwen3", help="model id on the server (default: %(default)s)")
    parser.add_argument("--savepoints", nargs="*", default=None,
                        help="selectors or name=selector pairs (default: the server's default, _logits)")
    parser.add_argument("--tokens", choices=["all", "first", "last"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--format", choices=["pt", "safetensors"], default="safetensors")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="with {question} (default: %(default)r)")
    parser.add_argument("--limit", type=int, help="only the first N problems")
    parser.add_argument("--resume", action="store_true", help="skip problems already in the manifest")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="record the server's file paths instead of downloading the files")
    parser.add_argument("--delete-remote", action="store_true", help="delete each run on the server once downloaded")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = read_problems(args.input)[: args.limit]
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "manifest.jsonl"
    done = done_ids(manifest)
    if done and not args.resume:
        print(f"capture-collect: {manifest} already holds {len(done)} problems; pass --resume to continue it "
              "or choose another --out", file=sys.stderr)
        return 2
    url = args.url or f"http://{args.host}:{args.port}"
    client = CaptureClient(url, api_key=args.api_key, timeout_s=args.timeout)
    todo = [p for p in problems if p["id"] not in done]
    print(f"capture-collect: {len(problems)} problems, {len(problems) - len(todo)} done already, {len(todo)} to go",
          file=sys.stderr)
    progress = _progress(len(todo))
    failures = 0
    with manifest.open("a") as out:
        for problem in todo:
            try:
                record = collect_one(client, problem, args, args.out / "files")
            except ServerFault as exc:
                failures += 1
                print(f"\ncapture-collect: {problem['id']}: {exc}", file=sys.stderr)
                progress.update(1)
                continue
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())  # a line that is there survives an interruption
            progress.update(1)
    progress.close()
    records = [json.loads(line) for line in manifest.open() if line.strip()]
    correct = sum(1 for r in records if r.get("correct"))
    print(f"accuracy: {correct}/{len(records)} = {100 * correct / max(1, len(records)):.1f}%"
          + (f" ({failures} failed, rerun with --resume)" if failures else ""))
    return 1 if failures else 0


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="problem", file=sys.stderr)
    except ImportError:  # the light install has no tqdm: a plain counter
        class Counter:
            def __init__(self):
                self.n = 0

            def update(self, k):
                self.n += k
                print(f"\r{self.n}/{total}", end="", file=sys.stderr, flush=True)

            def close(self):
                print(file=sys.stderr)

        return Counter()


if __name__ == "__main__":
    raise SystemExit(main())
