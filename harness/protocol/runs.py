"""Chat requests with capture, and their tensors, fetched once per session and shared.

Many checks look at the same capture (a 5-token greedy story: its shape, its
argmax, its file, its snapshot). Asking once keeps the suites fast; greedy
answers are deterministic, so sharing loses nothing. Tests that need a fresh
answer (concurrency, state leaks) pass ``cached=False``.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Mapping, Sequence

from capture_conformance.harness.protocol.client import CaptureClient, ServerFault, chat_body
from capture_conformance.harness.protocol.dialects import missing
from capture_conformance.harness.protocol.responses import Completion, SavepointMeta
from capture_conformance.harness.protocol.tensors import LoadedTensor, load_tensor_file, size_cap


# The one wording of a file_path that is not on the harness's machine (the report groups skips by it).
NOT_REACHABLE = "file not reachable from here"


class CaptureRuns:
    def __init__(self, client: CaptureClient, model: str, dialect: str = "protocol-v1"):
        self.client = client
        self.model = model
        self.dialect = dialect
        self._completions: dict[str, Completion] = {}
        self._files: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self.tokenizer: Any = None  # set by the fixture once the ground truth is known; see Completion.tokenizer

    def request_body(self, messages: Sequence[Mapping[str, str]] | str, max_tokens: int | None,
                     **extra: Any) -> dict:
        return chat_body(self.model, messages, max_tokens, **{k: v for k, v in extra.items() if v is not None})

    def chat(self, messages: Sequence[Mapping[str, str]] | str, max_tokens: int | None = None, *,
             cached: bool = True, **extra: Any) -> Completion:
        """A 200 chat completion (``capture=...`` or ``store_activations=True`` for tensors)."""
        body = self.request_body(messages, max_tokens, **extra)
        if self.dialect == "interventions" and (body.get("capture") is not None or body.get("store_activations")):
            # Capture there is server-wide configuration of decoder-layer hook points, never per request.
            missing("per-request capture", self.dialect)
        if self.dialect == "store_activations" and body.get("capture") is not None:
            missing("the 'capture' object", self.dialect)
        key = json.dumps(body, sort_keys=True)
        if cached:
            with self._lock:
                if key in self._completions:
                    return self._completions[key]
        answer = self.client.post("/v1/chat/completions", body)
        completion = Completion(answer.ok_json(), body, self.tokenizer, self.dialect)
        if cached:
            with self._lock:
                self._completions.setdefault(key, completion)
        return completion

    def capture(self, messages: Sequence[Mapping[str, str]] | str, max_tokens: int, *,
                savepoints: list | None = None, tokens: str | None = None, dtype: str | None = None,
                file_format: str | None = None, cached: bool = True, **extra: Any) -> Completion:
        """A chat with a ``capture`` object (only the given fields are sent)."""
        capture = {k: v for k, v in (("savepoints", savepoints), ("tokens", tokens), ("dtype", dtype),
                                     ("format", file_format)) if v is not None}
        return self.chat(messages, max_tokens, capture=capture, cached=cached, **extra)

    def file_bytes(self, completion: Completion, name: str) -> bytes:
        """The savepoint's file, downloaded from its ``url`` within the advertised size."""
        meta = completion.savepoint(name)
        key = (str(completion.body.get("activation_run_id") or id(completion)), name)
        with self._lock:
            if key in self._files:
                return self._files[key]
        cap = size_cap(meta.advertised_numel, meta.dtype)
        if not meta.raw.get("url") and self.dialect != "protocol-v1":
            data = _local_file(meta, cap, self.dialect)
        else:
            url = _url_of(meta)
            data = self.client.download(url, max_bytes=cap, what=f"savepoint {name!r} ({url})")
        with self._lock:
            self._files[key] = data
        return data

    def tensor(self, completion: Completion, name: str) -> LoadedTensor:
        meta = completion.savepoint(name)
        data = self.file_bytes(completion, name)
        return load_tensor_file(data, what=f"savepoint {name!r}", declared_format=meta.raw.get("format"))


def _url_of(meta: SavepointMeta) -> str:
    url = meta.raw.get("url")
    if not isinstance(url, str) or not url:
        raise ServerFault(
            f"activations_meta[{meta.name!r}] has no url to download the file from "
            f"(keys: {sorted(meta.raw)}); the harness cannot check the stored tensor"
        )
    return url


def _local_file(meta: SavepointMeta, cap: int, dialect: str) -> bytes:
    """A dialect without downloads: the file at ``file_path``, when the harness runs on the server's host.

    Elsewhere (a remote server's path, or none given) the file cannot be checked: every check that
    needs it is skipped as "file not reachable from here", which the report lists once.
    """
    path = meta.raw.get("file_path")
    if not isinstance(path, str) or not os.path.isfile(path):
        missing(NOT_REACHABLE, dialect)
    if os.path.getsize(path) > cap:
        raise ServerFault(f"activations_meta[{meta.name!r}]: {path} has {os.path.getsize(path)} bytes, more than "
                          f"the {cap} its metadata admits to")
    with open(path, "rb") as f:
        return f.read()
