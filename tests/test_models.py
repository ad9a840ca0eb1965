"""The peewee models describe the tables the migrations create, column for column."""

from __future__ import annotations

from typing import Any

import pytest

from storage.models import TASK_STATUSES, Project, Task


@pytest.mark.parametrize("model", [Project, Task])
async def test_model_columns_are_the_table_columns(app: Any, model: Any) -> None:
    rows = await app.services.db.fetchall(
        "SELECT column_name, is_nullable = 'YES' FROM information_schema.columns"
        " WHERE table_name = %s",
        [model._meta.table_name],
    )
    table = dict(rows)
    fields = {f.column_name: f.null for f in model._meta.sorted_fields}
    assert fields == table


async def test_statuses_are_the_enum_in_its_order(app: Any) -> None:
    row = await app.services.db.fetchone("SELECT enum_range(NULL::task_status)::text[]")
    assert tuple(row[0]) == TASK_STATUSES
