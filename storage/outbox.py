"""The transactional outbox: every change of a task or project writes one event row in the
change's own transaction, and PostgreSQL wakes every instance with a NOTIFY carrying its id."""

from __future__ import annotations

import contextlib
import json
import uuid as uuid_module
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage.db import Database
from storage.views import (
    PROJECT_AGGREGATES,
    PROJECT_COLUMNS,
    PROJECT_FROM,
    PROJECT_SELECT,
    TASK_COLUMNS,
    json_object,
    project_from_row,
)

# Taken (for the rest of the transaction) just before ids are drawn: a later transaction
# cannot draw ids until this one has committed, so ids become visible in increasing order.
EVENT_LOCK_KEY = 0x5A7C4E2
CHANNEL = "satchel_events"


# Payloads keep the archive key (not a link): links are signed when an event is delivered.
_PROJECT_JSON = json_object(PROJECT_COLUMNS)
_TASK_JSON = json_object([*TASK_COLUMNS, ("project", _PROJECT_JSON)])
_INSERT = (
    "INSERT INTO event (id, type, task_id, project_id, changed, payload)"  # noqa: S608
    " SELECT e.id, e.type, e.task_id, e.project_id, e.changed,"
    f" CASE WHEN e.task_id IS NULL THEN {_PROJECT_JSON}::jsonb ELSE {_TASK_JSON}::jsonb END"
    " FROM jsonb_to_recordset(%s::jsonb) AS e(id bigint, type text, task_id uuid,"
    "  project_id uuid, changed text[])"
    " LEFT JOIN task t ON t.uuid = e.task_id"
    " JOIN project p ON p.uuid = e.project_id" + PROJECT_AGGREGATES
)
_PROJECTS = f"SELECT {PROJECT_SELECT} FROM {PROJECT_FROM} WHERE p.uuid = ANY(%s::uuid[])"  # noqa: S608


@dataclass
class Event:
    """One change to record."""

    type: str
    project_id: uuid_module.UUID
    task_id: uuid_module.UUID | None = None
    changed: list[str] = field(default_factory=list)


async def record(db: Database, events: Sequence[Event]) -> None:
    """Write `events` (in this order) inside the caller's transaction, and notify on commit."""
    if not events:
        return
    await db.execute("SELECT pg_advisory_xact_lock(%s)", [EVENT_LOCK_KEY])
    # Every writer holds the lock while it draws, so this block of ids is contiguous.
    row = await db.fetchone(
        "SELECT setval('event_id_seq', nextval('event_id_seq') + %s - 1)", [len(events)]
    )
    assert row is not None
    first = int(row[0]) - len(events) + 1
    records = [
        {
            "id": first + offset,
            "type": event.type,
            "task_id": None if event.task_id is None else str(event.task_id),
            "project_id": str(event.project_id),
            "changed": event.changed,
        }
        for offset, event in enumerate(events)
    ]
    await db.execute(_INSERT, [json.dumps(records)])
    await db.execute("SELECT pg_notify(%s, %s)", [CHANNEL, str(first + len(events) - 1)])


@contextlib.asynccontextmanager
async def recording(
    db: Database, project_ids: Iterable[uuid_module.UUID]
) -> AsyncIterator[list[Event]]:
    """Collect the events of a change to these projects' tasks, inside its transaction.

    On leaving the block (without an error) the events are recorded, followed by a
    `project.updated` for every project whose representation the change altered.
    """
    projects = list(project_ids)
    before = await _project_views(db, projects)
    events: list[Event] = []
    yield events
    after = await _project_views(db, projects)
    await record(db, events + _project_changes(before, after))


async def _project_views(
    db: Database, ids: Iterable[uuid_module.UUID]
) -> dict[uuid_module.UUID, dict[str, Any]]:
    """The projects as clients see them, to compare before and after a change."""
    wanted = sorted({str(i) for i in ids})
    if not wanted:
        return {}
    rows = await db.fetchall(_PROJECTS, [wanted])
    return {uuid_module.UUID(row[0]): project_from_row(row) for row in rows}


def _project_changes(
    before: Mapping[uuid_module.UUID, Mapping[str, Any]],
    after: Mapping[uuid_module.UUID, Mapping[str, Any]],
) -> list[Event]:
    """A `project.updated` for each project whose representation changed."""
    events = []
    for project_id, new in after.items():
        old = before.get(project_id, {})
        changed = [key for key, value in new.items() if old.get(key) != value]
        if changed:
            events.append(Event("project.updated", project_id, changed=changed))
    return events
