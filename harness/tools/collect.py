"""``capture-collect``: run a GSM8K-style problem set through a capture server and keep the activations.

Each problem (JSONL with ``question`` and ``answer`` ending in ``#### <number>``,
optionally ``id``) is sent through chat with capture; the completion, the
extracted answer, whether it is correct, and the activation files (downloaded
into the output directory, or only their server paths with ``--no-download``)
go into ``manifest.jsonl``, one line per problem, appended and flushed as each
one finishes. ``settings.json`` beside it records what the run asks for (model,
savepoints, tokens, positions, dtype, format, template, temperature,
max_tokens); ``--layers`` names decoder blocks by index, and their selectors are
discovered in the model (its local config, else the server's ``capture.savepoints``),
whatever the family calls its block stack; ``--resume`` skips the ids already done, and refuses to continue a
run made with other settings. Without ``--host``/``--url`` the bundled reference
server is started for the run. ``capture_conformance.harness.tools.dataset.load_run(OUT)`` reads the result.

    capture-collect --input fixtures/gsm8k_sample.jsonl --out runs/gsm \\
        --layers 0 -1 [--savepoints logits] [--positions prompt] [--host H --port P] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

from capture_conformance.harness.protocol.client import CaptureClient, ServerFault
from capture_conformance.harness.protocol.responses import Completion
from capture_conformance.harness.protocol.tensors import size_cap
from capture_conformance.harness.tools import help_text

SETTINGS_FILE = "settings.json"
# A request refused with one of these may succeed later; any other 4xx will be refused for every problem.
RETRYABLE_4XX = (408, 409, 425, 429)


class RequestRefused(Exception):
    """The server refused a request as the client's mistake: every other problem would be refused the same way."""

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


def layer_savepoints(args, client: CaptureClient) -> list[str]:
    """``--layers`` as ``layer_I=<block I>`` over the discovered block stack, after ``--savepoints``."""
    from capture_conformance.harness.tools.savepoints import model_layout

    layout = model_layout(args.model, client)
    out = list(args.savepoints or [])
    for index in args.layers:
        if not -layout.num_blocks <= index < layout.num_blocks:
            raise LookupError(f"layer {index} is out of range: the model has {layout.num_blocks} blocks "
                              f"({layout.blocks}, from {layout.source})")
        name = f"layer_{index % layout.num_blocks}"
        out.append(f"{name}={layout.block(index)}")
    return out


def collect_one(client: CaptureClient, problem: dict, args, files_dir: Path) -> dict:
    prompt = args.prompt_template.format(question=problem["question"])
    capture = {"tokens": args.tokens, "dtype": args.dtype, "format": args.format}
    if args.positions != "generated":  # a 1.0 server refuses the field: only sent when asked for
        capture["positions"] = args.positions
    if args.savepoints:
        capture["savepoints"] = parse_savepoints(args.savepoints)
    answer = client.chat(args.model, prompt, args.max_tokens, capture=capture, temperature=args.temperature)
    if 400 <= answer.status < 500 and answer.status not in RETRYABLE_4XX:
        raise RequestRefused(answer.describe())
    body = answer.expect_status(200).json_object()
    reply = Completion(body, {"capture": capture})  # the library's validating view: a malformed answer is named
    completion = reply.content
    extracted = extract_answer(completion)
    gold = extract_answer(problem["answer"])
    activations = {}
    run_dir = files_dir / _safe_component(problem["id"])
    for name, meta in (reply.meta.items() if "activations_meta" in body else ()):
        entry = {"shape": meta.shape, "dtype": meta.dtype, "server_path": meta.raw.get("file_path"),
                 "url": meta.raw.get("url")}
        if args.download:
            data = client.download(meta.url, max_bytes=size_cap(meta.numel, meta.dtype), what=name)
            run_dir.mkdir(parents=True, exist_ok=True)
            local = run_dir / f"{_safe_component(name)}.{meta.raw.get('format', args.format)}"
            _write_atomically(local, data)
            entry["file"] = str(local.relative_to(files_dir.parent))
        activations[name] = entry
    if args.download and args.delete_remote and body.get("activation_run_id"):
        client.delete(f"/v1/activations/{body['activation_run_id']}")  # every file is on disk by now
    return {
        "id": problem["id"],
        "server": client.base_url,
        "positions": args.positions,
        "prompt": prompt,
        "prompt_token_ids": body.get("prompt_token_ids"),
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
    parser = argparse.ArgumentParser(prog="capture-collect", description=help_text.summary(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="problems, JSONL: question, answer[, id]")
    parser.add_argument("--out", type=Path, required=True, help="output directory (manifest.jsonl, files/)")
    parser.add_argument("--host", action="append", default=None, metavar="HOST[:PORT]",
                        help="a capture server; repeat for several, each row records which one served it "
                             "(default: none given starts the bundled reference server)")
    parser.add_argument("--port", type=int, default=8006, help="port for a --host given without one (default: %(default)s)")
    parser.add_argument("--url", action="append", default=None, help="base URL; repeatable; overrides --host/--port")
    parser.add_argument("--concurrency", type=int, default=1, metavar="K",
                        help="requests in flight per server (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("CAPTURE_API_KEY"),
                        help="the server's key (default: $CAPTURE_API_KEY; prefer it to this flag, which shows in ps)")
    parser.add_argument("--model", default="tiny-qwen3", help="model id on the server (default: %(default)s)")
    parser.add_argument("--savepoints", nargs="*", default=None,
                        help="selectors or name=selector pairs (default: the server's default, _logits)")
    parser.add_argument("--layers", nargs="*", type=int, default=None, metavar="I",
                        help="decoder blocks whose outputs to capture, as indices into the block stack discovered "
                             "in the model (negative from the end), named layer_I; added to --savepoints "
                             "(add --savepoints _logits=logits for the logits too)")
    parser.add_argument("--tokens", choices=["all", "first", "last"], default="all",
                        help="all, or the first or last of the positions asked for (default: %(default)s)")
    parser.add_argument("--positions", choices=["generated", "prompt", "sequence"], default="generated",
                        help="generated steps [1,N,D], prompt positions [1,P,D], or both [1,P+N,D] "
                             "(protocol 1.1; default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="(default: %(default)s, greedy)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="capture dtype (default: %(default)s)")
    parser.add_argument("--format", choices=["pt", "safetensors"], default="safetensors",
                        help="file format (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=256, help="per problem (default: %(default)s)")
    parser.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="with {question} (default: %(default)r)")
    parser.add_argument("--limit", type=int, help="only the first N problems")
    parser.add_argument("--resume", action="store_true", help="skip problems already in the manifest; refused when its settings.json differs from these options")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="record the server's file paths instead of downloading the files")
    parser.add_argument("--delete-remote", action=argparse.BooleanOptionalAction, default=True,
                        help="delete each run on the server once its files are downloaded (default: on)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    return parser


def run_settings(args) -> dict:
    """What decides the content of every row: a resumed run must ask for the same."""
    return {"model": args.model, "savepoints": args.savepoints, "layers": args.layers, "tokens": args.tokens, "positions": args.positions,
            "dtype": args.dtype, "format": args.format, "prompt_template": args.prompt_template,
            "temperature": args.temperature, "max_tokens": args.max_tokens}


def settings_differences(recorded: dict, now: dict) -> list[str]:
    return [f"{key}: {recorded.get(key)!r} in the run, {value!r} now" for key, value in now.items()
            if recorded.get(key) != value]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.url is None and args.host is None and not args.download:
        print("capture-collect: --no-download needs --host or --url: the bundled server's files go with it",
              file=sys.stderr)
        return 2
    problems = read_problems(args.input)[: args.limit]
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "manifest.jsonl"
    settings_path = args.out / SETTINGS_FILE
    done = done_ids(manifest)
    if done and not args.resume:
        print(f"capture-collect: {manifest} already holds {len(done)} problems; pass --resume to continue it "
              "or choose another --out", file=sys.stderr)
        return 2
    settings = run_settings(args)
    if done:
        if not settings_path.exists():
            print(f"capture-collect: {manifest} has no {SETTINGS_FILE} (an older run): its settings cannot be "
                  "checked, so it is not resumed; choose another --out", file=sys.stderr)
            return 2
        differences = settings_differences(json.loads(settings_path.read_text()), settings)
        if differences:
            print(f"capture-collect: --resume would mix settings in {args.out}: " + "; ".join(differences),
                  file=sys.stderr)
            return 2
    server = None
    if args.url is None and args.host is None:
        from capture_conformance.harness.protocol.server import ManagedServer, ServerStartError

        server = ManagedServer.prepare(launch=None, model=args.model, api_key=args.api_key, startup_timeout_s=300.0)
        print(f"capture-collect: no --host: starting the bundled reference server ({args.model})", file=sys.stderr)
        server.start()
        try:
            server.wait_ready()
        except ServerStartError as exc:
            server.stop()
            print(f"capture-collect: {exc}", file=sys.stderr)
            return 2
        urls = [server.base_url]
    else:
        urls = args.url or [h if ":" in h else f"{h}:{args.port}" for h in args.host]
        urls = [u if u.startswith(("http://", "https://")) else f"http://{u}" for u in urls]
    try:
        return _collect(args, urls, problems, done, manifest, settings_path, settings)
    finally:
        if server is not None:
            server.stop()


def _collect(args, urls: list[str], problems: list[dict], done: set, manifest: Path, settings_path: Path,
             settings: dict) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from capture_conformance.harness.protocol.probe import probe_capture_server

    if args.concurrency < 1:
        print("capture-collect: --concurrency must be at least 1", file=sys.stderr)
        return 2
    for url in urls:
        problem = probe_capture_server(url, args.api_key, wait_loading_s=60.0)
        if problem:  # unreachable or not a capture server: one line, not one failure per problem
            print(problem.replace("capture-conformance:", "capture-collect:", 1), file=sys.stderr)
            return 2
    clients = [CaptureClient(url, api_key=args.api_key, timeout_s=args.timeout) for url in urls]
    if args.layers:
        try:
            args.savepoints = layer_savepoints(args, clients[0])
        except LookupError as exc:
            print(f"capture-collect: --layers: cannot tell the model's block stack: {exc}", file=sys.stderr)
            return 2
    # Written with the first row (a run that fails before it leaves none, and a stale file from such a
    # run is replaced): settings.json always describes the rows present. The selectors as sent (``--layers``
    # resolved) go with it, for whoever reads the run.
    settings_text = (json.dumps({**settings, "selectors": args.savepoints}, indent=2) + "\n").encode()
    settings_written = bool(done)
    renderer = _PromptText(args.model)
    todo = [p for p in problems if p["id"] not in done]
    print(f"capture-collect: {len(problems)} problems, {len(problems) - len(todo)} done already, {len(todo)} to go"
          + (f", {len(urls)} server{'s' if len(urls) > 1 else ''} x {args.concurrency} in flight"
             if len(urls) > 1 or args.concurrency > 1 else ""),
          file=sys.stderr)
    progress = _progress(len(todo))
    queue = list(reversed(todo))
    slots = [client for client in clients for _ in range(args.concurrency)]
    pool = ThreadPoolExecutor(max_workers=len(slots))
    running: dict = {}
    try:
        with manifest.open("a") as out:
            written = _run_queue(args, pool, queue, slots, running, out, renderer, progress, settings_path,
                                 settings_text, settings_written)
    except KeyboardInterrupt:
        progress.close()
        print(f"\ncapture-collect: interrupted; {len(done_ids(manifest))} problems are in {manifest}: rerun with "
              f"--resume to continue", file=sys.stderr)
        pool.shutdown(wait=True, cancel_futures=True)  # the requests in flight end (a second Ctrl-C kills them)
        kept = done_ids(manifest)
        for _, problem in running.values():  # their files, if any, belong to no row: no orphans
            if problem["id"] not in kept:
                shutil.rmtree(args.out / "files" / _safe_component(problem["id"]), ignore_errors=True)
        return 130
    pool.shutdown()
    failures, refused = written
    progress.close()
    if refused is not None:
        print(f"capture-collect: {refused}\n"
              "capture-collect: every problem would be refused the same way: stopped; fix the options "
              "(--savepoints, --positions, --model, ...) and rerun", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in manifest.open() if line.strip()]
    correct = sum(1 for r in records if r.get("correct"))
    print(f"accuracy: {correct}/{len(records)} = {100 * correct / max(1, len(records)):.1f}%"
          + (f" ({failures} failed, rerun with --resume)" if failures else ""))
    return 1 if failures else 0



def _run_queue(args, pool, queue: list, slots: list, running: dict, out, renderer, progress, settings_path: Path,
               settings_text: bytes, settings_written: bool) -> tuple[int, str | None]:
    """Keep every slot busy until the queue is done; append each row as it finishes. -> (failures, refusal)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    failures = 0
    refused: str | None = None
    while queue or running:
        while queue and slots and refused is None:
            client, problem = slots.pop(), queue.pop()
            future = pool.submit(collect_one, client, problem, args, args.out / "files")
            running[future] = (client, problem)
        if not running:
            break
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            client, problem = running.pop(future)
            slots.append(client)
            try:
                record = future.result()
            except RequestRefused as exc:
                if refused is None:
                    refused = f"{problem['id']}: the server refused the request: {exc}"
                continue
            except ServerFault as exc:
                failures += 1
                print(f"\ncapture-collect: {problem['id']}: {exc}", file=sys.stderr)
                progress.update(1)
                continue
            if not settings_written:
                _write_atomically(settings_path, settings_text)
                settings_written = True
            record["prompt_text"] = renderer.text(record.get("prompt_token_ids"))
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())  # a line that is there survives an interruption
            progress.update(1)
    return failures, refused

class _PromptText:
    """The chat-rendered prompt as text, from its ids, with the model's tokenizer when it is available locally."""

    def __init__(self, model: str):
        self._model = model
        self._tokenizer = None
        self._tried = False

    def text(self, ids: list[int] | None) -> str | None:
        if not ids:
            return None
        if not self._tried:
            self._tried = True
            from capture_conformance.harness.protocol.ground_truth import resolve_ground_truth

            try:
                self._tokenizer = resolve_ground_truth(self._model).tokenizer
            except Exception:  # no local copy, no transformers: the ids are still recorded
                self._tokenizer = None
        return None if self._tokenizer is None else self._tokenizer.decode(ids)


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
