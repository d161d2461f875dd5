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

A verified collection (docs/collections.md): each row records the size and sha256 of every
file it wrote and the sha256 of settings.json; settings.json, written with the first row,
adds a provenance block (model id, its revision or weights hash where known, model and
capture dtype, each server's /health and /v1/models answers, protocol and tool versions,
and the verdict of --conformance-report) and the first row's files.

    capture-collect [collect] --input fixtures/gsm8k_sample.jsonl --out runs/gsm \\
        --layers 0 -1 [--savepoints logits] [--positions prompt] [--host H --port P] [--resume]
        [--conformance-report conformance-report.json]
    capture-collect verify RUN [--sizes-only]
    capture-collect export RUN --to datasets|safetensors|numpy --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path

from capture_conformance.harness.protocol.client import CaptureClient, ServerFault
from capture_conformance.harness.protocol.responses import Completion
from capture_conformance.harness.protocol.tensors import size_cap
from capture_conformance.harness.tools import help_text
from capture_conformance.harness.tools.manifest import (
    SETTINGS_FILE,
    file_record,
    sha256_bytes,
    sha256_file,
)

SUBCOMMANDS = ("collect", "verify", "export")
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
            # what was written, hashed from the bytes in hand: verify and load_run check the files against it
            entry.update(file_record(str(local.relative_to(files_dir.parent)), data))
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
    parser = argparse.ArgumentParser(
        prog="capture-collect", description=help_text.summary(__doc__),
        epilog="subcommands ('collect', these options, is the default):\n"
               "  capture-collect verify RUN       check every row and file of a run (verify --help)\n"
               "  capture-collect export RUN --to datasets|safetensors|numpy --out DIR   (export --help)",
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
    parser.add_argument("--conformance-report", type=Path, default=None, metavar="PATH",
                        help="a capture-conformance JSON report (conformance-report.json, or its directory) of this "
                             "server and model, run before: its verdict goes into settings.json's provenance "
                             "(default: none; the provenance then says no conformance report was given)")
    return parser


def conformance_verdict(path: Path, model: str) -> dict:
    """The verdict of a capture-conformance report, for the provenance; ValueError when it is not one for ``model``."""
    from collections import Counter

    if path.is_dir():
        path = path / "conformance-report.json"
    try:
        data = path.read_bytes()
        report = json.loads(data)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--conformance-report {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(report, dict) or report.get("tool") != "capture-conformance":
        raise ValueError(f"--conformance-report {path}: not a capture-conformance report (no tool: capture-conformance)")
    if report.get("model") not in (None, model):
        raise ValueError(f"--conformance-report {path}: it judged model {report.get('model')!r}, this run collects "
                         f"{model!r}")
    tests = report.get("tests") if isinstance(report.get("tests"), list) else []
    return {"report": str(path.resolve()), "report_sha256": sha256_bytes(data), "passed": report.get("passed"),
            "capture_level": report.get("capture_level"), "profile": report.get("profile"),
            "counts": dict(sorted(Counter(str(t.get("outcome")) for t in tests if isinstance(t, dict)).items())),
            "model": report.get("model"), "url": (report.get("target") or {}).get("url"),
            "protocol": report.get("protocol"), "started_at": report.get("started_at")}


def _answer_json(call) -> object:
    """A GET's JSON answer as recorded in the provenance (or what came instead)."""
    try:
        answer = call()
    except ServerFault as exc:
        return {"error": str(exc)}
    try:
        return answer.json()
    except Exception:  # not JSON: its status and opening are what there is to record
        return {"status": answer.status, "text": answer.text[:500]}


def _local_weights(model: str) -> dict | None:
    """sha256 of a built-in model's weight files as built here (fixtures/zoo.py), or None."""
    try:
        from capture_conformance.fixtures.zoo import builtin_model_dir, is_builtin
    except ImportError:
        return None
    if not is_builtin(model):
        return None
    directory = builtin_model_dir(model)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return None
    return {"sha256": {f.name: sha256_file(f) for f in files},
            "source": f"the built-in model's local build ({directory}): built deterministically from its recipe, "
                      "the same bytes a server building it serves; the server itself reported no weights hash"}


def gather_provenance(args, clients: list[CaptureClient], conformance: dict | None) -> dict:
    """What produced the run: model and weights, dtypes, servers and their answers, versions, conformance verdict."""
    from capture_conformance.harness import PROTOCOL_VERSION

    servers = [{"url": c.base_url, "health": _answer_json(c.health), "models": _answer_json(c.models)}
               for c in clients]
    listed = servers[0]["models"].get("data") if isinstance(servers[0]["models"], dict) else None
    entry = next((e for e in listed or [] if isinstance(e, dict) and e.get("id") == args.model), {})
    capture = entry.get("capture") if isinstance(entry.get("capture"), dict) else {}
    told = {key: entry.get(key) or capture.get(key) for key in ("revision", "weights_sha256")}
    if told["weights_sha256"]:
        weights = {"sha256": told["weights_sha256"], "source": "the server (/v1/models)"}
    else:
        weights = _local_weights(args.model) or {"sha256": "unknown", "source": "the server reports no weights hash"}
    health = servers[0]["health"] if isinstance(servers[0]["health"], dict) else {}
    return {
        "model": {"id": args.model, "revision": told["revision"] or "unknown", "weights": weights,
                  "dtype": capture.get("dtype") or "unknown"},
        "capture_dtype": args.dtype,
        "servers": servers,
        "protocol": {"server": health.get("protocol") or "unknown", "harness": PROTOCOL_VERSION},
        "tool": {"name": "capture-collect", "version": _tool_version()},
        "conformance": conformance or {"given": False,
                                       "note": "no --conformance-report given: no conformance verdict recorded"},
    }


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("capture-conformance")
    except PackageNotFoundError:
        return "unknown"


def provenance_differences(recorded: dict, now: dict) -> list[str]:
    """What a resume must not change: the model's weights, revision and dtype (the server's URL may change)."""
    was, new = recorded.get("model") or {}, now.get("model") or {}
    out = []
    for key in ("revision", "dtype"):
        if was.get(key) != new.get(key):
            out.append(f"model {key}: {was.get(key)!r} in the run, {new.get(key)!r} now")
    if (was.get("weights") or {}).get("sha256") != (new.get("weights") or {}).get("sha256"):
        out.append("model weights: their sha256 differs from the run's")
    return out


def run_settings(args) -> dict:
    """What decides the content of every row: a resumed run must ask for the same."""
    return {"model": args.model, "savepoints": args.savepoints, "layers": args.layers, "tokens": args.tokens, "positions": args.positions,
            "dtype": args.dtype, "format": args.format, "prompt_template": args.prompt_template,
            "temperature": args.temperature, "max_tokens": args.max_tokens}


def settings_differences(recorded: dict, now: dict) -> list[str]:
    return [f"{key}: {recorded.get(key)!r} in the run, {value!r} now" for key, value in now.items()
            if recorded.get(key) != value]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return verify_main(argv[1:])
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    if argv and argv[0] == "collect":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    conformance = None
    if args.conformance_report is not None:
        try:
            conformance = conformance_verdict(args.conformance_report, args.model)
        except ValueError as exc:
            print(f"capture-collect: {exc}", file=sys.stderr)
            return 2
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
        return _collect(args, urls, problems, done, manifest, settings_path, settings, conformance)
    finally:
        if server is not None:
            server.stop()


def _collect(args, urls: list[str], problems: list[dict], done: set, manifest: Path, settings_path: Path,
             settings: dict, conformance: dict | None = None) -> int:
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
    provenance = gather_provenance(args, clients, conformance)
    if done:
        recorded = json.loads(settings_path.read_text()).get("provenance")
        differences = provenance_differences(recorded, provenance) if recorded else []
        if differences:
            print(f"capture-collect: --resume would mix models in {args.out}: " + "; ".join(differences),
                  file=sys.stderr)
            return 2
        if conformance is not None and (recorded or {}).get("conformance") != conformance:
            print("capture-collect: note: settings.json keeps the provenance of the run's first row; "
                  "this --conformance-report is not recorded", file=sys.stderr)

    # Written with the first row (a run that fails before it leaves none, and a stale file from such a
    # run is replaced): settings.json always describes the rows present, and is never rewritten after:
    # each row records its sha256. The selectors as sent (``--layers`` resolved) go with it, for whoever
    # reads the run, and the first row's files, so that the settings and the data vouch for each other.
    def settings_text(record: dict) -> bytes:
        first = {"id": record["id"], "files": {name: {k: entry.get(k) for k in ("file", "size", "sha256")}
                                               for name, entry in record["activations"].items()}}
        document = {**settings, "selectors": args.savepoints,
                    "provenance": {**provenance, "collected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                    "first_row": first}
        return (json.dumps(document, indent=2) + "\n").encode()

    settings_written = sha256_bytes(settings_path.read_bytes()) if done else None
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
               settings_text, settings_written: str | None) -> tuple[int, str | None]:
    """Keep every slot busy until the queue is done; append each row as it finishes. -> (failures, refusal).

    ``settings_written``: the sha256 of settings.json once it is written (None before the first row);
    ``settings_text(record)``: its bytes, made from the first row.
    """
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
            if settings_written is None:
                text = settings_text(record)
                _write_atomically(settings_path, text)
                settings_written = sha256_bytes(text)
            record["settings_sha256"] = settings_written
            record["prompt_text"] = renderer.text(record.get("prompt_token_ids"))
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())  # a line that is there survives an interruption
            progress.update(1)
    return failures, refused

def verify_main(argv: list[str]) -> int:
    """``capture-collect verify RUN``: one line per problem, naming the row and the file; exit 1 on any."""
    from capture_conformance.harness.tools.manifest import summary, verify_run

    parser = argparse.ArgumentParser(
        prog="capture-collect verify",
        description="Check a collection run: every manifest row against settings.json (its sha256, positions, "
                    "savepoints, dtype) and every file it references (present, inside the run, its size and "
                    "sha256); files no row references; rows without files. One line per problem, naming the "
                    "row (problem id) and the file; exit 1 on any problem, 2 when RUN is not a run.")
    parser.add_argument("run", type=Path, help="a capture-collect output directory (manifest.jsonl, settings.json)")
    parser.add_argument("--sizes-only", action="store_true",
                        help="check sizes, not hashes: no file is read (default: hash every file)")
    args = parser.parse_args(argv)
    try:
        problems = verify_run(args.run, "sizes" if args.sizes_only else "full")
    except FileNotFoundError as exc:
        print(f"capture-collect verify: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"{args.run}: {problem.line()}")
    counts = summary(args.run)
    checked = "sizes" if args.sizes_only else "sizes and sha256"
    state = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}" if problems else "ok"
    print(f"capture-collect verify: {args.run}: {counts['rows']} rows, {counts['files']} files, "
          f"{counts['bytes']} bytes, {checked} checked: {state}", file=sys.stderr)
    return 1 if problems else 0


def export_main(argv: list[str]) -> int:
    """``capture-collect export RUN --to FORMAT --out DIR``: the run verified in full, then written."""
    from capture_conformance.harness.tools.dataset import load_run
    from capture_conformance.harness.tools.export import DEFAULT_SHARD_BYTES, FORMATS, ExportError, export_run
    from capture_conformance.harness.tools.manifest import RunVerificationError

    parser = argparse.ArgumentParser(
        prog="capture-collect export",
        description="Export a collection run, verified in full first (a tampered run is refused), to a Hugging "
                    "Face datasets directory (load_from_disk; settings and provenance as JSON in "
                    "info.description) or to safetensors or NumPy shards with index.json (docs/collections.md).")
    parser.add_argument("run", type=Path, help="a capture-collect output directory")
    parser.add_argument("--to", choices=FORMATS, required=True, help="datasets, safetensors or numpy")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (new or empty)")
    parser.add_argument("--savepoints", nargs="*", default=None,
                        help="the savepoints to export (default: all of the run's)")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20,
                        help="shard size limit in MiB for safetensors/numpy; a row is never split "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run, args.savepoints, verify="full")
        out = export_run(run, args.to, args.out, int(args.shard_mb * 2**20))
    except (FileNotFoundError, RunVerificationError, ExportError, KeyError, ImportError) as exc:
        print(f"capture-collect export: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, RunVerificationError) else 2
    print(out)
    return 0


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
