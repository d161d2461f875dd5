"""Errors that carry their HTTP status, raised anywhere below the web layer.

The web layer turns each into ``{"detail": message}`` with its status; nothing
below it needs to know about FastAPI.
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
