"""Errors that carry their HTTP status, raised anywhere below the web layer.

The web layer turns each into ``error_body(...)`` (``{"detail": message, "error": {...}}``)
with its status; nothing below it needs to know about FastAPI.
"""

from __future__ import annotations


class CaptureError(Exception):
    status_code = 400

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class BadRequest(CaptureError):
    status_code = 400


class Unauthorized(CaptureError):
    status_code = 401


class NotFound(CaptureError):
    status_code = 404


class PayloadTooLarge(CaptureError):
    status_code = 413


class Unprocessable(CaptureError):
    status_code = 422


class NotReady(CaptureError):
    status_code = 503


class StorageFull(CaptureError):
    status_code = 507


class Forbidden(CaptureError):
    status_code = 403


class Conflict(CaptureError):
    status_code = 409


class Overloaded(CaptureError):
    """503 with ``Retry-After``: the server is healthy but busy; the same request may succeed later."""

    status_code = 503

    def __init__(self, detail: str, retry_after_s: int = 1):
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after_s)}


# OpenAI's error ``type`` by status, so that OpenAI SDKs and tools classify our errors as theirs.
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_body(status: int, detail, *, message: str | None = None, param: str | None = None,
               code: str | None = None) -> dict:
    """The body of every error answer the server sends.

    ``detail`` is the protocol's field (a string, or pydantic's list for a 422 of
    validation); ``error`` is OpenAI's envelope beside it, whose ``message`` the
    ``openai`` SDKs show in ``APIStatusError``. One builder, used by every handler
    and by the ASGI guards, so the two never drift apart.
    """
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    text = message if message is not None else (detail if isinstance(detail, str) else str(detail))
    return {"detail": detail, "error": {"message": text, "type": kind, "param": param, "code": code}}
