"""The public shape of projects and tasks, computed by PostgreSQL in one statement per page.

Columns come back already as the text the contract wants (UUIDs, money with two decimals,
dates, RFC 3339 UTC timestamps). Timestamps keep their microseconds: items of one batch are a
microsecond apart, and a client must be able to see the order `created_at, uuid` it lists in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def _ts(column: str) -> str:
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


# The aggregates of the contract: latest estimate, lowest status (the enum's order), smallest
# progress, and the count; an aggregate without GROUP BY yields one row even with no tasks.
PROJECT_AGGREGATES = """
    CROSS JOIN LATERAL (
        SELECT max(pt.estimate_date)::text AS estimate_date, min(pt.status)::text AS status,
               min(pt.progress) AS progress, count(*) AS tasks_count
        FROM task pt WHERE pt.project_id = p.uuid
    ) agg"""

PROJECT_COLUMNS = (
    ("uuid", "p.uuid::text"),
    ("name", "p.name"),
    ("description", "p.description"),
    ("price", "p.price::text"),
    ("estimate_date", "agg.estimate_date"),
    ("status", "agg.status"),
    ("progress", "agg.progress"),
    ("tasks_count", "agg.tasks_count"),
    ("created_at", _ts("p.created_at")),
    ("updated_at", _ts("p.updated_at")),
)

TASK_COLUMNS = (
    ("uuid", "t.uuid::text"),
    ("name", "t.name"),
    ("description", "t.description"),
    ("estimate_date", "t.estimate_date::text"),
    ("price", "t.price::text"),
    ("urls", "t.urls"),
    ("status", "t.status::text"),
    ("progress", "t.progress"),
    ("archive_key", "t.archive_key"),
    ("error", "t.error"),
    ("created_at", _ts("t.created_at")),
    ("updated_at", _ts("t.updated_at")),
)


def json_object(columns: Sequence[tuple[str, str]]) -> str:
    """A json_build_object() of (key, SQL expression) pairs."""
    return "json_build_object(" + ", ".join(f"'{name}', {expr}" for name, expr in columns) + ")"


# Whole rows as JSON text built by PostgreSQL: a page is then joined, not rebuilt, in Python.
# A task's archive link is null here; a finished task's is signed when it is rendered.
PROJECT_JSON = json_object(PROJECT_COLUMNS) + "::text"
TASK_JSON = (
    json_object(
        [
            *(
                (n, e)
                for n, e in TASK_COLUMNS
                if n not in ("archive_key", "created_at", "updated_at")
            ),
            ("archive_url", "NULL"),
            ("project", json_object(PROJECT_COLUMNS)),
            *((n, e) for n, e in TASK_COLUMNS if n in ("created_at", "updated_at")),
        ]
    )
    + "::text"
)

PROJECT_SELECT = ", ".join(expr for _, expr in PROJECT_COLUMNS)
PROJECT_FROM = "project p" + PROJECT_AGGREGATES
TASK_FROM = "task t JOIN project p ON p.uuid = t.project_id" + PROJECT_AGGREGATES

_PROJECT_KEYS = tuple(name for name, _ in PROJECT_COLUMNS)

# Makes the public link of a stored archive key (presigned, or under a public base URL).
LinkMaker = Callable[[str], str]


def project_from_row(row: Sequence[Any]) -> dict[str, Any]:
    """A Project as the contract shows it, from a row of PROJECT_SELECT."""
    return dict(zip(_PROJECT_KEYS, row, strict=True))
