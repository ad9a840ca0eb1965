"""The base handler: request ids, CORS, bounded JSON bodies, and every error as problem+json."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn

import orjson
import tornado.web
from marshmallow import Schema, ValidationError

from storage.errors import (
    InvalidJson,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    SatchelError,
    UnsupportedMediaType,
    ValidationFailed,
)

if TYPE_CHECKING:
    from server.app import Services

log = logging.getLogger("satchel.http")

# Bodies past the contract's limit are read and thrown away (so the client gets its 413 rather
# than a reset connection) up to this size; beyond it the connection is simply closed.
DISCARD_LIMIT = 64 * 1024 * 1024
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_TORNADO_CODES = {
    400: InvalidJson,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """Shared behaviour of every HTTP endpoint."""

    route = ""
    _request_id: str | None = None

    def initialize(self, route: str = "") -> None:
        """`route` is the path template used in metrics and logs."""
        self.route = route
        self._body = bytearray()
        self._body_too_large = False

    @property
    def services(self) -> Services:
        """The process's shared services (database, stores, S3, metrics, settings)."""
        return self.application.settings["services"]  # type: ignore[no-any-return]

    @property
    def request_id(self) -> str:
        """The client's X-Request-ID when it is sane, otherwise a new one."""
        if self._request_id is None:
            given = self.request.headers.get("X-Request-ID", "")
            self._request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        return self._request_id

    def set_default_headers(self) -> None:
        """Headers every response carries, errors included (send_error resets the others)."""
        self.set_header("X-Request-ID", self.request_id)
        origin = self.request.headers.get("Origin")
        if origin and origin in self.services.settings.cors_origins:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Expose-Headers", "X-Request-ID, Location")
            self.add_header("Vary", "Origin")

    def allowed_methods(self) -> list[str]:
        """The methods this endpoint implements, for `Allow`."""
        base = tornado.web.RequestHandler
        found = [
            m for m in _METHODS if getattr(type(self), m.lower()) is not getattr(base, m.lower())
        ]
        return [*found, "OPTIONS"]

    def prepare(self) -> None:
        """Refuse a declared body over the limit before reading it."""
        if self.request.method not in self.allowed_methods():
            raise MethodNotAllowed(f"{self.request.method} is not allowed here.")
        length = self.request.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > DISCARD_LIMIT:
            self._too_large()
        self.request.connection.set_max_body_size(DISCARD_LIMIT)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        """Keep the body while it is within the limit; count and drop it past that."""
        if self._body_too_large:
            return
        if len(self._body) + len(chunk) > self.services.settings.max_body_bytes:
            self._body_too_large = True
            self._body.clear()
            return
        self._body += chunk

    def options(self, *_: str) -> None:
        """CORS preflight, and the methods this endpoint allows."""
        self.set_header("Allow", ", ".join(self.allowed_methods()))
        if "Access-Control-Allow-Origin" in self._headers:
            self.set_header("Access-Control-Allow-Methods", ", ".join(self.allowed_methods()))
            asked = self.request.headers.get("Access-Control-Request-Headers")
            self.set_header("Access-Control-Allow-Headers", asked or "Content-Type, X-Request-ID")
            self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def _too_large(self) -> NoReturn:
        limit = self.services.settings.max_body_bytes
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")

    def json_body(self) -> Any:
        """The request body parsed as JSON; numbers come back as exact Decimals."""
        if self._body_too_large:
            self._too_large()
        body = bytes(self._body)
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            if not body and not content_type:
                raise InvalidJson("A JSON request body is required.")
            raise UnsupportedMediaType("The request body must be application/json.")
        try:
            text = body.decode("utf-8")
            data = json.loads(
                text, parse_float=Decimal, parse_int=Decimal, parse_constant=_reject_constant
            )
            if _SURROGATE_ESCAPE.search(text):
                # An unpaired `\ud800` escape decodes to a string no UTF-8 encoder (the
                # database's, ours) accepts; this raises UnicodeEncodeError for one.
                json.dumps(data, default=str, ensure_ascii=False).encode("utf-8")
            return data
        except (ValueError, RecursionError) as exc:
            raise InvalidJson(f"The request body is not valid JSON: {_json_reason(exc)}") from None

    def load_query(self, schema: Schema) -> dict[str, Any]:
        """The known query parameters, validated; a bad value is a 422 keyed by its name."""
        known = {
            name: self.get_query_argument(name)
            for name in schema.fields
            if self.get_query_arguments(name)
        }
        try:
            return schema.load(known)  # type: ignore[no-any-return]
        except ValidationError as exc:
            raise ValidationFailed("Invalid query parameters.", errors=exc.messages) from None

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """Path and query bytes as text, with bytes that are not UTF-8 replaced."""
        # Tornado's default answers 400, a body error; a bad value is a 422 (or a 404 in a path).
        return value.decode("utf-8", errors="replace")

    def parse_uuid(self, text: str) -> uuid.UUID:
        """A UUID from the path; anything else names no item, so 404."""
        if not _UUID.match(text):
            raise NotFound("No such item.")
        return uuid.UUID(text)

    def compute_etag(self) -> str | None:
        """No ETags: hashing every JSON page costs more than clients gain from it."""
        return None

    def send_json(self, payload: Any, status: int = 200) -> None:
        """Write `payload` as the JSON response."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(payload))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Render any failure as RFC 9457 problem details; never exception text for a 500."""
        error = _as_satchel_error(status_code, kwargs.get("exc_info"))
        self.set_status(error.status)
        for name, value in error.headers.items():
            self.set_header(name, value)
        if error.status == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        problem: dict[str, Any] = {
            "type": f"/errors/{error.code.removesuffix('_error')}",
            "title": error.title,
            "status": error.status,
            "code": error.code,
        }
        if error.detail:
            problem["detail"] = error.detail
        if error.errors is not None:
            problem["errors"] = error.errors
        problem["request_id"] = self.request_id
        self.set_header("Content-Type", "application/problem+json")
        # marshmallow keys list errors by int index; the contract shows them as strings.
        self.finish(orjson.dumps(problem, option=orjson.OPT_NON_STR_KEYS))

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:  # type: ignore[override]
        """Log unexpected failures with their traceback and request id; expected ones not."""
        if isinstance(value, tornado.web.HTTPError) and value.status_code < 500:
            return
        if isinstance(value, SatchelError) and value.status != 500:
            if value.status >= 500:
                log.warning("%s: %s", value.code, value, extra={"request_id": self.request_id})
            return
        log.error(
            "unhandled error in %s %s",
            self.request.method,
            self.route or self.request.path,
            exc_info=(typ, value, tb),  # type: ignore[arg-type]
            extra={"request_id": self.request_id},
        )


def _as_satchel_error(status_code: int, exc_info: Any) -> SatchelError:
    exc = exc_info[1] if exc_info else None
    if isinstance(exc, SatchelError):
        return exc
    if isinstance(exc, tornado.web.HTTPError) and exc.status_code in _TORNADO_CODES:
        return _TORNADO_CODES[exc.status_code](exc.log_message or None)
    if status_code in _TORNADO_CODES:
        return _TORNADO_CODES[status_code]()
    return SatchelError()


def _json_reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply."
    if isinstance(exc, UnicodeError):
        return "not UTF-8 text."
    return str(exc).split(":", 1)[0] + "." if isinstance(exc, json.JSONDecodeError) else str(exc)


def validate_items(
    schema: Schema, items: list[Any]
) -> tuple[list[Mapping[str, Any] | None], dict[str, Any]]:
    """Validate each item of a batch; invalid ones become None with their errors by index."""
    loaded: list[Mapping[str, Any] | None] = []
    errors: dict[str, Any] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            errors[str(index)] = {"_schema": ["Must be a JSON object."]}
            loaded.append(None)
            continue
        try:
            loaded.append(schema.load(item))  # type: ignore[arg-type]
        except ValidationError as exc:
            errors[str(index)] = exc.messages
            loaded.append(None)
    return loaded, errors


class NotFoundHandler(BaseHandler):
    """Every path no route matches."""

    def prepare(self) -> None:
        """Answer 404 whatever the method."""
        raise NotFound(f"No resource at {self.request.path}.")
