"""marshmallow schemas: what clients may send, and (for the OpenAPI document) what they get."""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from marshmallow import Schema, ValidationError, fields, pre_load, validate

from storage.models import TASK_STATUSES

MAX_URLS = 100
MAX_URL_LENGTH = 2048
# numeric(14, 2): twelve digits before the point.
MONEY_LIMIT = Decimal(10) ** 12
CENT = Decimal("0.01")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# PostgreSQL's OFFSET is a bigint: a larger value is invalid, not a server error.
MAX_OFFSET = 2**63 - 1
MONEY_DOC = {
    "oneOf": [
        {"type": "number", "minimum": 0, "exclusiveMaximum": 1e12},
        {"type": "string", "pattern": r"^\s*[0-9]{1,12}(\.[0-9]{1,2})?\s*$"},
    ],
    "description": "Exact amount >= 0 with at most 2 decimals; returned as a string.",
}
MONEY_OR_NULL_DOC = {**MONEY_DOC, "oneOf": [*MONEY_DOC["oneOf"], {"type": "null"}]}  # type: ignore[misc]
NAME_DOC = {"minLength": 1, "maxLength": 255}
# An absolute http(s) URL whose last path segment is not empty; file_url_problem() decides.
_URL_CHAR = r"[^\s/?#\x00-\x1f\x7f]"
FILE_URL_PATTERN = (
    rf"^[Hh][Tt][Tt][Pp][Ss]?://{_URL_CHAR}+/([^\s?#\x00-\x1f\x7f]*/)?{_URL_CHAR}+"
    r"([?#][^\s\x00-\x1f\x7f]*)?$"
)
URL_DOC = {"format": "uri", "pattern": FILE_URL_PATTERN, "maxLength": MAX_URL_LENGTH}
URLS_DOC = {"minItems": 1, "maxItems": MAX_URLS, "uniqueItems": True}


class Text(fields.String):
    """A string PostgreSQL can store: `text` columns cannot hold NUL characters."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text: str = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise ValidationError("Must not contain NUL characters.")
        return text


class Name(Text):
    """A required display name: 1..255 characters once surrounding white space is trimmed."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs).strip()
        if not text:
            raise ValidationError("Must not be blank.")
        if len(text) > 255:
            raise ValidationError("Must be at most 255 characters long.")
        return text


class Money(fields.Field):  # type: ignore[type-arg]
    """An exact amount: a JSON number or a numeric string, >= 0, at most 2 decimals."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
            raise ValidationError("Must be a number or a numeric string.")
        try:
            amount = Decimal(value.strip() if isinstance(value, str) else str(value))
        except InvalidOperation:
            raise ValidationError("Must be a number or a numeric string.") from None
        if not amount.is_finite():
            raise ValidationError("Must be a finite number.")
        if amount < 0:
            raise ValidationError("Must be greater than or equal to 0.")
        if amount >= MONEY_LIMIT:
            raise ValidationError("Must have at most 12 digits before the decimal point.")
        if amount != amount.quantize(CENT):
            raise ValidationError("Must have at most 2 decimal places.")
        return amount.quantize(CENT)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else f"{value:.2f}"


class FutureDate(fields.Date):
    """A calendar date, `YYYY-MM-DD`, that is today (UTC) or later."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime.date:
        # date.fromisoformat also takes `20270115` and week dates; the contract says YYYY-MM-DD.
        if not isinstance(value, str) or not _DATE.fullmatch(value):
            raise self.make_error("invalid")
        day = super()._deserialize(value, attr, data, **kwargs)
        if day < datetime.datetime.now(datetime.UTC).date():
            raise ValidationError("Must not be in the past.")
        return day


def file_url_problem(url: str) -> str | None:
    """Why `url` is not an absolute http(s) link to a file, or None when it is one."""
    if len(url) > MAX_URL_LENGTH:
        return f"Must be at most {MAX_URL_LENGTH} characters long."
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "Not a valid URL."
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port
    except ValueError:
        return "Not a valid URL."
    if parts.scheme.lower() not in ("http", "https"):
        return "Must be an absolute http or https URL."
    if not host:
        return "Must be an absolute http or https URL."
    if not parts.path.rsplit("/", 1)[-1]:
        return "Not a link to a file."
    return None


class FileUrl(fields.String):
    """An absolute http/https URL whose path names a file."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        url = super()._deserialize(value, attr, data, **kwargs)
        problem = file_url_problem(url)
        if problem:
            raise ValidationError(problem)
        return url


class FileUrls(fields.List):  # type: ignore[type-arg]
    """1..100 distinct file URLs; errors are keyed by the index of the offending URL."""

    def __init__(self, **kwargs: Any) -> None:
        # apispec documents a list's items from its inner field, so their rules go there.
        super().__init__(FileUrl(metadata=URL_DOC), **kwargs)

    def _deserialize(  # type: ignore[override]
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_URLS:
            raise ValidationError(f"Must hold between 1 and {MAX_URLS} URLs.")
        urls: list[str] = super()._deserialize(value, attr, data, **kwargs)  # type: ignore[assignment]
        first: dict[str, int] = {}
        repeats: dict[int, list[str]] = {}
        for index, url in enumerate(urls):
            if url in first:
                repeats[index] = [f"Duplicate of the URL at index {first[url]}."]
            first.setdefault(url, index)
        if repeats:
            raise ValidationError(repeats)  # type: ignore[arg-type]
        return urls


class InputSchema(Schema):
    """A request body item: unknown fields are rejected by name, read-only ones said so."""

    read_only: tuple[str, ...] = ()

    @pre_load
    def _reject_read_only(self, data: Any, **_: Any) -> Any:
        if isinstance(data, Mapping):
            found = {name: ["Read-only field."] for name in self.read_only if name in data}
            if found:
                raise ValidationError(found)
        return data


TASK_READ_ONLY = (
    "uuid",
    "status",
    "progress",
    "archive_url",
    "error",
    "project",
    "created_at",
    "updated_at",
)


class ProjectCreate(InputSchema):
    """Body of `POST /projects`."""

    read_only = (
        "uuid",
        "estimate_date",
        "status",
        "progress",
        "tasks_count",
        "created_at",
        "updated_at",
    )
    name = Name(required=True, metadata=NAME_DOC)
    description = Text(allow_none=True, validate=validate.Length(max=10000))
    price = Money(required=True, metadata=MONEY_DOC)


class TaskCreate(InputSchema):
    """One item of `POST /tasks/batch_create`."""

    read_only = TASK_READ_ONLY
    name = Name(required=True, metadata=NAME_DOC)
    description = Text(allow_none=True, validate=validate.Length(max=10000))
    estimate_date = FutureDate(allow_none=True)
    price = Money(allow_none=True, metadata=MONEY_OR_NULL_DOC)
    urls = FileUrls(required=True, metadata=URLS_DOC)
    project_id = fields.UUID(required=True)


class TaskUpdate(InputSchema):
    """One item of `POST /tasks/batch_update`: only the fields given change."""

    read_only = (*TASK_READ_ONLY, "project_id")
    task_id = fields.UUID(required=True)
    name = Name(metadata=NAME_DOC)
    description = Text(allow_none=True, validate=validate.Length(max=10000))
    estimate_date = FutureDate(allow_none=True)
    price = Money(allow_none=True, metadata=MONEY_OR_NULL_DOC)
    urls = FileUrls(metadata=URLS_DOC)


class PageQuery(Schema):
    """`?limit=` and `?offset=` of every list."""

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=MAX_OFFSET))


class TaskQuery(PageQuery):
    """Filters of `GET /tasks`."""

    project_id = fields.UUID()
    status = fields.String(validate=validate.OneOf(TASK_STATUSES))


# Output shapes, for the OpenAPI document; responses are rendered from SQL rows directly.
class ProjectOut(Schema):
    """A project as every response shows it."""

    uuid = fields.UUID(required=True)
    name = fields.String(required=True)
    description = fields.String(allow_none=True, required=True)
    price = fields.String(required=True, metadata={"example": "1500.00"})
    estimate_date = fields.Date(allow_none=True, required=True)
    status = fields.String(allow_none=True, required=True, validate=validate.OneOf(TASK_STATUSES))
    progress = fields.Integer(allow_none=True, required=True)
    tasks_count = fields.Integer(required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


class TaskOut(Schema):
    """A task as every response shows it."""

    uuid = fields.UUID(required=True)
    name = fields.String(required=True)
    description = fields.String(allow_none=True, required=True)
    estimate_date = fields.Date(allow_none=True, required=True)
    price = fields.String(allow_none=True, required=True, metadata={"example": "300.00"})
    urls = fields.List(fields.String(), required=True)
    status = fields.String(required=True, validate=validate.OneOf(TASK_STATUSES))
    progress = fields.Integer(required=True, validate=validate.Range(min=0, max=100))
    archive_url = fields.String(allow_none=True, required=True)
    error = fields.String(allow_none=True, required=True)
    project = fields.Nested(ProjectOut, required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


class ProblemOut(Schema):
    """RFC 9457 problem details, as every error is rendered."""

    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    code = fields.String(required=True)
    detail = fields.String()
    errors = fields.Dict()
    request_id = fields.String(required=True)
