"""ASGI middleware that guards every request before the app sees it: API key, body size.

Pure ASGI (not FastAPI dependencies) so that they hold for every route,
``/docs`` and ``/openapi.json`` included, and so that a body is refused while
it streams in, before it is buffered whole.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from .errors import error_body

OPEN_PATHS = {"/health"}  # a load balancer must be able to probe without the key


async def _send_error(send, status: int, detail: str) -> None:
    body = json.dumps(error_body(status, detail)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyGuard:
    """``Authorization: Bearer <key>`` on every path but /health; 401 with no other detail.

    The scheme is compared case-insensitively (RFC 7235: ``bearer`` and ``BEARER``
    are ``Bearer``), the key in constant time, so that the time taken does not
    tell how much of a guessed key was right.
    """

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = api_key.encode()

    def _authorized(self, header: bytes) -> bool:
        scheme, _, credentials = header.strip().partition(b" ")
        key_ok = hmac.compare_digest(credentials.strip(), self._expected)  # always run: no early exit on the scheme
        return scheme.lower() == b"bearer" and key_ok

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not self._authorized(given):
                await _send_error(send, 401, "unauthorized")
                return
        await self.app(scope, receive, send)


LOOPBACK_HOSTS = {b"localhost", b"127.0.0.1", b"[::1]"}
LOOPBACK_BINDS = {"127.0.0.1", "localhost", "::1"}


def _host_name(header: bytes) -> bytes:
    """``Host`` without its port: ``[::1]:8006`` -> ``[::1]``, ``LocalHost.:80`` -> ``localhost``."""
    header = header.strip().lower()
    if header.startswith(b"["):
        return header.partition(b"]")[0] + b"]"
    return header.rpartition(b":")[0].rstrip(b".") if b":" in header else header.rstrip(b".")


class LoopbackHostGuard:
    """421 unless ``Host`` names the loopback: a keyless server bound to 127.0.0.1 against DNS rebinding.

    A page in a browser can resolve its own name to 127.0.0.1 and then talk to a
    local server as a same-origin site, but its requests carry that name in
    ``Host``. Only localhost, 127.0.0.1 and [::1] (any port) are served; a request
    without ``Host`` (HTTP/1.0, no browser) passes.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host")
            if host is not None and _host_name(host) not in LOOPBACK_HOSTS:
                shown = host[:100].decode("latin-1")
                await _send_error(send, 421, f"Host {shown!r} is not served: this server has no --api-key and is "
                                             "bound to the loopback, so only Host localhost, 127.0.0.1 or [::1] "
                                             "(any port) is answered (DNS rebinding)")
                return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413 naming the limit when a request body is larger than ``max_bytes``."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        # Each piece of the body must arrive within this (a client that stops sending holds a
        # connection and a task for ever otherwise); None waits as long as the client.
        self.read_timeout_s = read_timeout_s

    def _detail(self, size: int | str) -> str:
        return f"request body of {size} bytes is over the limit of {self.max_bytes} bytes (--max-body-bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, 413, self._detail(int(declared)))
            return
        # Read the body here, up to the limit (bodies are small JSON), and replay it:
        # an exception raised from receive() would reach FastAPI's parser as a 400.
        chunks, received = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                await _send_error(send, 408, f"the request body did not arrive within {self.read_timeout_s:g} s "
                                             "(--body-timeout-s)")
                return
            if message["type"] != "http.request":
                break  # a disconnect: let the app see an empty body and end
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                await _send_error(send, 413, self._detail(f"more than {self.max_bytes}"))
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
