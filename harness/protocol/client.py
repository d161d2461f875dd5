"""The one HTTP client the suites use to talk to the server under test.

The server is untrusted and may be broken in any way, so every call here is
bounded (connect and read timeouts plus a wall-clock deadline, a byte cap on
every body) and every way it can go wrong ends in a ``ServerFault``: an
``AssertionError`` whose message names the endpoint and says what the server
did, so a garbage answer fails the test that asked for it with a readable line
instead of a ``JSONDecodeError`` or ``KeyError`` from inside the harness.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urljoin, urlsplit

import requests

# JSON answers larger than this are refused: no endpoint of the protocol needs more,
# and a server streaming garbage forever must not exhaust the harness's memory.
MAX_JSON_BYTES = 64 * 2**20
CONNECT_TIMEOUT_S = 5.0
EXCERPT_CHARS = 200
# The port capture servers of this family listen on unless told otherwise.
DEFAULT_PORT = 8006


class ServerFault(AssertionError):
    """The server under test answered wrongly, too late, or not at all."""


def excerpt(data: bytes | str, limit: int = EXCERPT_CHARS) -> str:
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    text = " ".join(text.split())  # one line, whatever the server sent
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Answer:
    """One HTTP exchange, with helpers that fail readably."""

    method: str
    path: str
    status: int
    headers: Mapping[str, str]
    content: bytes
    elapsed_s: float

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def describe(self) -> str:
        ctype = self.content_type or "no content type"
        return f"{self.endpoint} answered {self.status} ({ctype}): {excerpt(self.content) or '<empty body>'}"

    def json(self) -> Any:
        ctype = self.content_type
        if not (ctype == "application/json" or ctype.endswith("+json")):
            raise ServerFault(
                f"{self.endpoint} answered {self.status} {ctype or 'with no content type'}, "
                f"not JSON: {excerpt(self.content) or '<empty body>'}"
            )
        try:
            return jsonlib.loads(self.content)
        except ValueError as exc:
            raise ServerFault(
                f"{self.endpoint} answered {self.status} with invalid JSON ({exc}): "
                f"{excerpt(self.content) or '<empty body>'}"
            ) from None

    def json_object(self) -> dict:
        body = self.json()
        if not isinstance(body, dict):
            raise ServerFault(f"{self.endpoint} answered a JSON {type(body).__name__}, not an object: {excerpt(self.content)}")
        return body

    def expect_status(self, *codes: int) -> "Answer":
        if self.status not in codes:
            wanted = " or ".join(str(c) for c in codes)
            raise ServerFault(f"expected {wanted}; {self.describe()}")
        return self

    def ok_json(self) -> dict:
        """The JSON object of a 200 answer."""
        return self.expect_status(200).json_object()


def chat_body(model: str, messages: Iterable[Mapping[str, Any]] | str, max_tokens: int | None = None, *,
              temperature: float | None = 0.0, capture: Mapping[str, Any] | None = None, **extra: Any) -> dict:
    """The one builder of a chat request body; ``messages`` may be one user prompt as a string.

    Greedy by default (``temperature: 0``); ``None`` leaves a field out.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body: dict[str, Any] = {"model": model, "messages": list(messages)}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if capture is not None:
        body["capture"] = dict(capture)
    body.update(extra)
    return body


@dataclass
class CaptureClient:
    """A ``requests.Session`` bound to one server, with the harness's limits.

    ``on_connection_error`` lets the owner of a managed server add what it knows
    (the process died, its log tail) to a refused connection.
    """

    base_url: str
    api_key: str | None = None
    timeout_s: float = 60.0
    on_connection_error: Callable[[], str] | None = None
    session: requests.Session = field(default_factory=requests.Session, repr=False)
    # Called with every Answer; the out-of-order suite watches all traffic of a test this way.
    observers: list[Callable[[Answer], None]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.session.headers["User-Agent"] = "capture-conformance"
        if self.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.api_key}"

    # -- plain requests -------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        authorized: bool = True,
        max_bytes: int = MAX_JSON_BYTES,
    ) -> Answer:
        """Send one request and read the whole answer, within ``timeout_s`` and ``max_bytes``."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        endpoint = f"{method} {path}"
        send_headers: dict[str, str | None] = dict(headers or {})
        if not authorized:
            send_headers["Authorization"] = None  # requests drops a session header set to None for this request
        started = time.monotonic()
        for attempt in (1, 2):
            try:
                response = self.session.request(
                    method,
                    self.url(path),
                    json=json,
                    data=data,
                    headers=send_headers,
                    timeout=(min(CONNECT_TIMEOUT_S, timeout), timeout),
                    stream=True,
                    allow_redirects=False,
                )
                with response:
                    content = read_capped(response, max_bytes=max_bytes, deadline=started + timeout, what=endpoint)
                break
            except requests.Timeout:
                raise ServerFault(f"{endpoint} got no answer within {timeout:g} s (--request-timeout)") from None
            except requests.ConnectionError as exc:
                # A kept-alive connection the server closed as idle just as this request went out: the
                # server never read it. Sent once more on a new connection, as browsers resend a request
                # whose reused connection closed before any byte of an answer; a server that drops the
                # request itself drops it again and is reported.
                if attempt == 1 and _closed_before_answering(exc):
                    continue
                raise ServerFault(self._connection_message(endpoint, exc)) from None
            except requests.RequestException as exc:
                raise ServerFault(f"{endpoint} failed: {type(exc).__name__}: {exc}") from None
        answer = Answer(method, path, response.status_code, response.headers, content, time.monotonic() - started)
        for observer in list(self.observers):
            observer(answer)
        return answer

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Answer:
        return self.request("POST", path, json=json, **kw)

    def delete(self, path: str, **kw: Any) -> Answer:
        return self.request("DELETE", path, **kw)

    # -- the protocol's endpoints ---------------------------------------------------------

    def health(self, **kw: Any) -> Answer:
        return self.get("/health", **kw)

    def models(self) -> Answer:
        return self.get("/v1/models")

    def listed_savepoints(self, model: str) -> list | None:
        """``capture.savepoints`` of ``model`` in ``/v1/models`` (the server's word), or None when not a list."""
        listed = (self.capture_block(model) or {}).get("savepoints")
        return listed if isinstance(listed, list) else None

    def capture_block(self, model: str) -> dict | None:
        """``/v1/models``' ``capture`` object of ``model`` (sizes, dtype, savepoints, features), or None.

        None when the server has no such route, answers otherwise than 200 JSON, or does not
        describe that model: every caller treats an undescribed model as "not stated".
        """
        try:
            entries = self.models().ok_json().get("data") or []
        except ServerFault:
            return None
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("id") == model and isinstance(entry.get("capture"), dict):
                return entry["capture"]
        return None

    def load_model(self, model_id: str, **extra: Any) -> Answer:
        return self.post("/models/load", {"model_id": model_id, **extra})

    def pure_nnsight(self, **body: Any) -> Answer:
        return self.post("/test_pure_nnsight", body)

    def chat(
        self,
        model: str,
        messages: Iterable[Mapping[str, str]] | str,
        max_tokens: int | None = None,
        *,
        capture: Mapping[str, Any] | None = None,
        temperature: float | None = 0.0,
        **extra: Any,
    ) -> Answer:
        """``POST /v1/chat/completions``; ``messages`` may be one user prompt as a string."""
        body = chat_body(model, messages, max_tokens, capture=capture, temperature=temperature, **extra)
        return self.post("/v1/chat/completions", body)

    # -- files ----------------------------------------------------------------------------

    def download(self, url: str, *, max_bytes: int, what: str, timeout_s: float | None = None) -> bytes:
        """Fetch a file the server pointed to, refusing more than ``max_bytes`` and other hosts."""
        target = self.url(url)
        if urlsplit(target).netloc != urlsplit(self.base_url).netloc:
            raise ServerFault(f"{what}: url {url!r} points away from the server under test; not downloaded")
        path = urlsplit(target).path
        answer = self.request("GET", path, timeout_s=timeout_s, max_bytes=max_bytes)
        if answer.status != 200:
            raise ServerFault(f"{what}: file not downloadable: {answer.describe()}")
        return answer.content

    # -- helpers --------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return urljoin(self.base_url + "/", path.lstrip("/")) if not path.startswith("http") else path

    def _connection_message(self, endpoint: str, exc: Exception) -> str:
        reason = _root_cause(exc)
        message = f"{endpoint}: cannot reach {self.base_url}: {reason}"
        if self.on_connection_error is not None:
            extra = self.on_connection_error()
            if extra:
                message += "\n" + extra
        return message


def _closed_before_answering(exc: BaseException) -> bool:
    """Whether the connection closed before any byte of an answer (http.client's RemoteDisconnected)."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, http.client.RemoteDisconnected):
            return True
        stack += [arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)]
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]
    return False


def read_capped(response: requests.Response, *, max_bytes: int, deadline: float, what: str) -> bytes:
    """Read a streamed body, aborting past ``max_bytes`` or after ``deadline`` (monotonic)."""
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ServerFault(
            f"{what} announced {int(declared)} bytes, more than the cap of {max_bytes} bytes; not downloaded"
        )
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_content(chunk_size=1 << 16):
        total += len(chunk)
        if total > max_bytes:
            raise ServerFault(f"{what} sent more than the cap of {max_bytes} bytes; download aborted")
        if time.monotonic() > deadline:
            raise ServerFault(f"{what} did not finish sending within the time limit; download aborted")
        chunks.append(chunk)
    return b"".join(chunks)


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 connection error, in a few words."""
    seen = exc
    while seen.__context__ is not None or seen.__cause__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    text = str(seen) or type(seen).__name__
    for marker in ("Connection refused", "Name or service not known", "No route to host", "timed out",
                   "Temporary failure in name resolution", "Connection reset"):
        if marker.lower() in text.lower():
            return marker.lower()
    return excerpt(text, 160)
