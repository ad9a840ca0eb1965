"""Typed errors raised below the handlers; `handlers.base` renders each as problem+json."""

from __future__ import annotations

from typing import Any


class SatchelError(Exception):
    """An error a client can see: a stable `code`, an HTTP status and a short title."""

    status = 500
    code = "internal_error"
    title = "Internal server error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


class InvalidJson(SatchelError):
    status, code, title = 400, "invalid_json", "Malformed request body"


class NotFound(SatchelError):
    status, code, title = 404, "not_found", "Not found"


class MethodNotAllowed(SatchelError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class Conflict(SatchelError):
    status, code, title = 409, "conflict", "Conflict"


class PayloadTooLarge(SatchelError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class UnsupportedMediaType(SatchelError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class ValidationFailed(SatchelError):
    status, code, title = 422, "validation_error", "Validation failed"


class ServiceUnavailable(SatchelError):
    status, code, title = 503, "service_unavailable", "Service unavailable"
