"""A server of the ``/v1/interventions`` family, with the defects such servers are known for.

Same engine as ``tests/other_stack_server.py`` (stdlib HTTP, transformers hooks,
the random-weight ``other-qwen3``), another dialect: ``GET /health`` is
``{"ok": true, "model": M, "device": ...}``, ``POST /v1/model`` loads,
``POST /v1/interventions`` configures capture for every later request, and a
chat response then carries ``ndif: {"request_id", "artifacts": {key: {"file",
"shape", "saved_shape", "dtype"}}}`` with files on the server's disk only.

Its defects, as seen in deployed servers of the family: prompt-only capture
(trace mode), ``saved_shape`` truncated by ``sample_hidden``, one-chunk
"streaming", an unknown ``model`` answered 200 (served by the loaded one), and
``max_tokens: 0`` answered 500.

    python tests/interventions_server.py --port 8012 --model-dir ./other-qwen3
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from http.server import ThreadingHTTPServer
from pathlib import Path

from other_stack_server import BadRequest, Engine, Handler, build_model


class InterventionsHandler(Handler):
    server_version = "interventions-capture/0.9"
    config: dict = {"enabled": False}

    def _get(self):
        engine = self.engine
        if self.path == "/health":
            return self._send(200, {"ok": True, "model": engine.model_id, "device": "cpu"})
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [
                {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "interventions"}]})
        self._send(404, {"detail": "Not Found"})

    def _delete(self):
        self._send(405, {"detail": "Method Not Allowed"})

    def _post(self):
        engine = self.engine
        body = self._body()
        if self.path == "/v1/model":
            if body.get("model") != engine.model_id:
                raise BadRequest(404, "cannot load that model")
            return self._send(200, {"ok": True, "model": engine.model_id})
        if self.path == "/v1/interventions":
            InterventionsHandler.config = {"enabled": bool(body.get("enabled")), "layers": body.get("layers") or [0],
                                           "hook_points": body.get("hook_points") or ["input_layernorm.output"],
                                           # the defect: features sampled down unless the client says otherwise
                                           "sample_hidden": body.get("sample_hidden", 64),
                                           "save_dir": body.get("save_dir") or str(self.storage)}
            return self._send(200, {"ok": True, "config": InterventionsHandler.config})
        if self.path == "/v1/chat/completions":
            return self._chat(body)
        self._send(404, {"detail": "Not Found"})

    def _chat(self, body: dict):
        engine = self.engine
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise BadRequest(422, "messages must be a list of {role, content}")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if max_tokens == 0:
            raise RuntimeError("empty generation")  # the defect: answered 500
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise BadRequest(422, "max_tokens must be a positive integer")
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise BadRequest(422, "temperature must be a number")
        if body.get("n", 1) != 1:
            raise BadRequest(400, "only n=1")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        # the defect: any `model` is served by the loaded one
        prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(prompt_ids, "keys"):
            prompt_ids = prompt_ids["input_ids"]
        prompt_ids = list(prompt_ids)
        ids, text, finish, _ = engine.generate(prompt_ids, max_tokens, stop=stop, temperature=float(temperature),
                                               top_p=float(body.get("top_p", 1.0)), seed=body.get("seed"),
                                               savepoints=[])
        answer = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                  "model": engine.model_id,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": finish}],
                  "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                            "total_tokens": len(prompt_ids) + len(ids)}}
        if self.config.get("enabled"):
            answer["ndif"] = self._trace(prompt_ids)
        if body.get("stream"):
            return self._one_chunk(answer)
        self._send(200, answer)

    def _trace(self, prompt_ids: list[int]) -> dict:
        """The defect of trace mode: one forward pass over the prompt, no generated positions."""
        engine, torch, config = self.engine, self.engine.torch, self.config
        request_id = uuid.uuid4().hex
        out_dir = Path(config["save_dir"]) / request_id
        out_dir.mkdir(parents=True, exist_ok=True)
        seen: dict[str, object] = {}
        handles = []
        for layer in config["layers"]:
            for point in config["hook_points"]:
                module, _ = engine.resolve(f"model.layers[{layer}].{point.removesuffix('.output')}")
                key = f"layer{layer}.{point}"
                handles.append(module.register_forward_hook(
                    lambda m, a, o, key=key: seen.__setitem__(key, (o[0] if isinstance(o, tuple) else o).clone())))
        try:
            with engine.lock, torch.inference_mode():
                engine.model(input_ids=torch.tensor([prompt_ids]))
        finally:
            for handle in handles:
                handle.remove()
        artifacts = {}
        for key, tensor in seen.items():
            saved = tensor[..., : config["sample_hidden"]] if config.get("sample_hidden") else tensor
            file = out_dir / f"{key}.pt"
            torch.save(saved.contiguous(), file)
            artifacts[key] = {"file": str(file), "shape": list(tensor.shape), "saved_shape": list(saved.shape),
                              "dtype": str(saved.dtype)}
        return {"request_id": request_id, "artifacts": artifacts}

    def _one_chunk(self, answer: dict):
        """The defect: "streaming" is the whole reply in one chunk."""
        choice = answer["choices"][0]
        chunk = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
                 "model": answer["model"], "choices": [{"index": 0, "delta": {
                     "role": "assistant", "content": choice["message"]["content"]},
                     "finish_reason": choice["finish_reason"]}]}
        data = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
        self._send(200, raw=data, ctype="text/event-stream")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--storage-dir", default=os.path.join(os.getcwd(), "interventions-storage"))
    args = parser.parse_args()
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        build_model(model_dir)
    InterventionsHandler.engine = Engine(model_dir, args.model_dir, set())
    InterventionsHandler.storage = Path(args.storage_dir)
    InterventionsHandler.storage.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer((args.host, args.port), InterventionsHandler)
    server.daemon_threads = True
    print(f"interventions capture server on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
