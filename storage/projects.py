"""Projects: reads with their task aggregates, and creation."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import orjson

from storage.feed import StoredEvent
from storage.outbox import Event, record
from storage.store import Store
from storage.views import PROJECT_AGGREGATES, PROJECT_FROM, PROJECT_JSON

_INSERT = "INSERT INTO project (name, description, price) VALUES (%s, %s, %s) RETURNING *"
_CREATE = f"WITH p AS ({_INSERT}) SELECT {PROJECT_JSON} FROM p {PROJECT_AGGREGATES}"  # noqa: S608


class ProjectStore(Store):
    """Projects with `estimate_date`, `status`, `progress` and `tasks_count` from SQL."""

    table = "project"
    alias = "p"
    json = PROJECT_JSON
    from_ = PROJECT_FROM

    def on_event(self, event: StoredEvent) -> None:
        """A project created on any instance changes the total."""
        super().on_event(event)
        if event.type == "project.created":
            self.forget_totals()

    async def create(
        self, *, name: str, price: Decimal, description: str | None = None
    ) -> dict[str, Any]:
        """Insert a project; a new project has no tasks, so its aggregates are empty."""
        async with self.db.transaction():
            row = await self.db.fetchone(_CREATE, [name, description, price])
            assert row is not None
            project: dict[str, Any] = orjson.loads(row[0])
            await record(self.db, [Event("project.created", uuid.UUID(project["uuid"]))])
        self.forget_totals()
        return project
