"""A stand-alone mimic of an older-family capture server, for testing the harness against it.

Servers of that family predate the ``capture`` object: they know only
``store_activations``, always store ``_logits`` and, like many deployed ones,
capture only the FIRST generated token (``[1, 1, V]`` whatever the length). They
report no protocol version and no ``capture`` block in ``/v1/models``.

Everything else is honest: real greedy generation with the embedded tiny model
through plain transformers (no nnsight), real usage counts, real files. So the
harness must fail it exactly where the feature is missing, with a message that
says so, and pass it where it behaves.

    python tests/legacy_server.py --port 8010 [--storage-dir DIR] [--model tiny-qwen3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path



def write_reply(handler: BaseHTTPRequestHandler, status: int, body: object, ctype: str, raw: bytes | None) -> None:
    data = raw if raw is not None else json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)

class LegacyModel:
    def __init__(self, model_id: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from capture_conformance.fixtures.tiny_model import resolve_model_path

        path = resolve_model_path(model_id)
        self.torch = torch
        self.model_id = model_id
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.lock = threading.Lock()  # one generation at a time, as these servers do

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop: list[str]):
        torch = self.torch
        with self.lock, torch.inference_mode():
            out = self.model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )
        ids = out.sequences[0, len(prompt_ids):].tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        finish = "stop" if len(ids) < max_new_tokens else "length"
        for s in stop:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return ids, text, finish, out.logits[0][:, None, :]  # logits of the first step only: [1, 1, V]


class Handler(BaseHTTPRequestHandler):
    server_version = "legacy-capture/0.3"
    model: LegacyModel
    storage: Path

    def log_message(self, fmt, *args):  # keep the log short
        pass

    def _send(self, status: int, body: object = None, raw: bytes | None = None, ctype: str = "application/json"):
        write_reply(self, status, body, ctype, raw)

    def _json(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def do_GET(self):
        if self.path == "/health":
            return self._send(200, {"status": "ok", "loaded_models": [self.model.model_id]})
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [
                {"id": self.model.model_id, "object": "model", "created": 0, "owned_by": "legacy"}]})
        match = re.fullmatch(r"/v1/activations/([0-9a-f]{32})/(_logits)", self.path)
        if match:
            file = self.storage / match.group(1) / "_logits.pt"
            if file.is_file():
                return self._send(200, raw=file.read_bytes(), ctype="application/octet-stream")
        return self._send(404, {"detail": "not found"})

    def do_POST(self):
        body = self._json()
        if body is None:
            return self._send(422, {"detail": "body must be a JSON object"})
        if self.path == "/models/load":
            if body.get("model_id") == self.model.model_id:
                return self._send(200, {"ok": True, "model": self.model.model_id})
            return self._send(404, {"detail": "cannot load that model"})
        if self.path == "/test_pure_nnsight":
            ids = self.model.tokenizer(body.get("prompt") or "Hello")["input_ids"]
            _, text, _, _ = self.model.generate(ids, int(body.get("max_new_tokens") or 1), [])
            vocab = self.model.model.config.vocab_size
            return self._send(200, {"success": True, "logits_shape": [1, 1, vocab], "logits_dtype": "torch.float32",
                                    "generated_text": text})
        if self.path == "/v1/chat/completions":
            return self._chat(body)
        return self._send(404, {"detail": "not found"})

    def _chat(self, body: dict):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._send(422, {"detail": "messages must be a non-empty list"})
        if body.get("model") != self.model.model_id:
            return self._send(404, {"detail": "model not loaded"})
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return self._send(422, {"detail": "max_tokens must be a positive integer"})
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        tok = self.model.tokenizer
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids, text, finish, first_logits = self.model.generate(prompt_ids, max_tokens, stop)
        answer = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                      "total_tokens": len(prompt_ids) + len(ids)},
        }
        if body.get("store_activations") or body.get("capture"):
            run_id = uuid.uuid4().hex
            run_dir = self.storage / run_id
            run_dir.mkdir(parents=True)
            path = run_dir / "_logits.pt"
            tensor = first_logits.float().contiguous().clone()
            self.model.torch.save(tensor, path)
            numel = tensor.numel()
            answer.update({
                "activation_run_id": run_id,
                "completion_token_ids": ids,
                "activations_meta": {"_logits": {
                    "shape": list(tensor.shape), "dtype": str(tensor.dtype), "numel": numel,
                    "size_mb": round(numel * 4 / 2**20, 2), "file_path": str(path),
                    "url": f"/v1/activations/{run_id}/_logits",
                }},
            })
        return self._send(200, answer)


class ScriptedServer:
    """An in-thread HTTP server whose every answer is scripted by a test (garbage included).

    ``routes`` maps ``(method, path)`` to ``handler(request)``; the handler calls
    ``request.reply(status, body, ctype)`` or writes to ``request.wfile`` itself
    (to send truncated, oversized or never-ending answers). Unknown routes are 404.
    """

    def __init__(self, routes: dict):
        routes = dict(routes)

        class Scripted(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):
                pass

            def reply(self, status: int, body: object = None, ctype: str = "application/json", raw: bytes | None = None):
                write_reply(self, status, body, ctype, raw)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _route(self, method: str):
                handler = routes.get((method, self.path.split("?")[0]))
                if handler is None:
                    return self.reply(404, {"detail": "not found"})
                try:
                    handler(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def healthy_routes(model: str = "tiny-qwen3") -> dict:
    """Just enough of the protocol to pass the harness's "is this a capture server" probe."""
    return {
        ("GET", "/health"): lambda r: r.reply(200, {"status": "ok", "loaded_models": [model], "protocol": "1"}),
        ("GET", "/v1/models"): lambda r: r.reply(200, {"object": "list", "data": [{"id": model, "object": "model"}]}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--storage-dir", default=os.path.join(os.getcwd(), "legacy-storage"))
    args = parser.parse_args()
    Handler.model = LegacyModel(args.model)
    Handler.storage = Path(args.storage_dir)
    Handler.storage.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"legacy capture server on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
