"""Projects: reads with their task aggregates, and creation."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from storage.outbox import Event, record
from storage.store import Store
from storage.views import PROJECT_AGGREGATES, PROJECT_FROM, PROJECT_SELECT, project_from_row

_INSERT = "INSERT INTO project (name, description, price) VALUES (%s, %s, %s) RETURNING *"
_CREATE = f"WITH p AS ({_INSERT}) SELECT {PROJECT_SELECT} FROM p {PROJECT_AGGREGATES}"  # noqa: S608


class ProjectStore(Store):
    """Projects with `estimate_date`, `status`, `progress` and `tasks_count` from SQL."""

    table = "project"
    alias = "p"
    select = PROJECT_SELECT
    from_ = PROJECT_FROM

    def render(self, row: Sequence[Any]) -> dict[str, Any]:
        """A Project as the contract shows it."""
        return project_from_row(row)

    async def create(
        self, *, name: str, price: Decimal, description: str | None = None
    ) -> dict[str, Any]:
        """Insert a project; a new project has no tasks, so its aggregates are empty."""
        async with self.db.transaction():
            row = await self.db.fetchone(_CREATE, [name, description, price])
            assert row is not None
            project = self.render(row)
            await record(self.db, [Event("project.created", uuid.UUID(project["uuid"]))])
        return project
