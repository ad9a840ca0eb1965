"""Generic reads shared by every resource: a page in contract order, or one item by UUID."""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storage.db import Database


@dataclass(frozen=True)
class Page:
    """One page of items and the number of items all pages hold."""

    items: list[dict[str, Any]]
    total: int


class Store:
    """Reads of one resource; subclasses name their table, columns and filters."""

    table: str
    alias: str
    select: str
    from_: str
    # Query parameter -> SQL condition on the resource's alias, with one %s for the value.
    filters: Mapping[str, str] = {}

    def __init__(self, db: Database) -> None:
        self.db = db

    def render(self, row: Sequence[Any]) -> dict[str, Any]:
        """The public representation of one row of `select`."""
        raise NotImplementedError

    async def page(self, *, limit: int, offset: int, **filters: Any) -> Page:
        """Items in `created_at`, `uuid` order, and the total, in one statement.

        The count is the left side of a lateral join, so an offset past the end still yields
        one row carrying the total, with NULLs where the page would be.
        """
        where, params = self._where(filters)
        a = self.alias
        sql = (
            f"SELECT c.total, page.* FROM"  # noqa: S608 - fragments are constants of this package
            f" (SELECT count(*) AS total FROM {self.table} {a} WHERE {where}) c"
            f" LEFT JOIN LATERAL (SELECT {self.select}, {a}.created_at AS _at, {a}.uuid AS _id"
            f" FROM {self.from_} WHERE {where}"
            f" ORDER BY {a}.created_at, {a}.uuid LIMIT %s OFFSET %s) page ON true"
            " ORDER BY page._at, page._id"
        )
        rows = await self.db.fetchall(sql, [*params, *params, limit, offset])
        items = [self.render(row[1:-2]) for row in rows if row[-1] is not None]
        return Page(items=items, total=rows[0][0] if rows else 0)

    async def get(self, uuid: uuid_module.UUID) -> dict[str, Any] | None:
        """One item, or None when no item has that UUID."""
        items = await self.get_many([uuid])
        return items[0] if items else None

    async def get_many(self, uuids: Sequence[uuid_module.UUID]) -> list[dict[str, Any]]:
        """The items with these UUIDs, in the order given (missing ones left out)."""
        sql = (
            f"SELECT {self.select} FROM {self.from_}"  # noqa: S608 - constants of this package
            f" WHERE {self.alias}.uuid = ANY(%s::uuid[])"
        )
        rows = await self.db.fetchall(sql, [[str(u) for u in uuids]])
        by_id = {row[0]: self.render(row) for row in rows}
        return [by_id[str(u)] for u in uuids if str(u) in by_id]

    def _where(self, filters: Mapping[str, Any]) -> tuple[str, list[Any]]:
        conditions, params = [], []
        for name, value in filters.items():
            if value is not None:
                conditions.append(self.filters[name])
                params.append(value)
        return " AND ".join(conditions) or "true", params
