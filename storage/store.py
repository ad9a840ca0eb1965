"""Generic reads shared by every resource: a page in contract order, or one item by UUID.

Rows come back from PostgreSQL as JSON text, so a page is joined rather than rebuilt.

Pages are remembered between requests (dashboards ask for the same first pages over and over),
as rows before archive links are signed, so links are still made afresh for every response.
Every change reaches every instance as an event, and any event drops the remembered pages;
this store's own writes drop them before they answer, so a client always reads its own writes.
A read that overlaps a drop is not remembered (the generation check), and nothing is kept
longer than PAGE_CACHE_TTL whatever happens to the event feed.

Totals of unfiltered (and some cheaply invalidated) lists are remembered longer: counting a
large table costs more than the page itself. They are dropped when this store writes, when an
event says they changed, or after TOTAL_TTL.
"""

from __future__ import annotations

import time
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from storage.db import Database

# Upper bounds on how stale a remembered total or page can be, whatever happens to the feed.
TOTAL_TTL = 5.0
PAGE_TTL = 2.0  # the default of PAGE_CACHE_TTL
# Distinct pages remembered per store before the memory is emptied.
MAX_PAGES = 256


@dataclass(frozen=True)
class Page:
    """One page of items (each as JSON text) and the number of items all pages hold."""

    items: list[str]
    total: int


class Store:
    """Reads of one resource; subclasses name their table, JSON expression and filters."""

    table: str
    alias: str
    json: str
    from_: str
    # SQL expression of a stored archive key to sign into `archive_url`, if the resource has one.
    link_column: str = "NULL"
    # Query parameter -> SQL condition on the resource's alias, with one %s for the value.
    filters: Mapping[str, str] = {}
    # Filters whose totals may be remembered (the unfiltered total always may).
    remembered: frozenset[str] = frozenset()

    def __init__(self, db: Database, *, page_ttl: float = PAGE_TTL) -> None:
        self.db = db
        self.page_ttl = page_ttl
        self.totals: dict[tuple[Any, ...], tuple[float, int]] = {}
        self.pages: dict[tuple[Any, ...], tuple[float, int, list[tuple[str, str | None]]]] = {}
        self.generation = 0

    def finish(self, text: str, key: str | None) -> str:
        """The row's JSON text, with its archive link signed when it has one."""
        return text

    def on_event(self, event: Any) -> None:
        """Any change may show on a page (aggregates included); subclasses drop totals too."""
        self.forget_pages()

    def forget_pages(self) -> None:
        """Drop remembered pages, and keep reads already under way from being remembered."""
        self.generation += 1
        self.pages.clear()

    def forget_totals(self) -> None:
        """Drop remembered totals and pages (after a write that may change them)."""
        self.totals.clear()
        self.forget_pages()

    async def page(self, *, limit: int, offset: int, **filters: Any) -> Page:
        """Items in `created_at`, `uuid` order, and the total."""
        given = {name: value for name, value in filters.items() if value is not None}
        key = (tuple(sorted(given.items())), limit, offset)
        remembered = self.pages.get(key)
        if remembered is not None and time.monotonic() - remembered[0] < self.page_ttl:
            _at, total, rows = remembered
        else:
            generation = self.generation
            total, rows = await self._read_page(given, limit=limit, offset=offset)
            if generation == self.generation and self.page_ttl > 0:
                if len(self.pages) >= MAX_PAGES:
                    self.pages.clear()
                self.pages[key] = (time.monotonic(), total, rows)
        return Page(items=[self.finish(text, link) for text, link in rows], total=total)

    async def _read_page(
        self, given: Mapping[str, Any], *, limit: int, offset: int
    ) -> tuple[int, list[tuple[str, str | None]]]:
        """Rows of one page and the total, in one statement."""
        generation = self.generation
        where, params = self._where(given)
        key = self._total_key(given)
        remembered = self.totals.get(key) if key is not None else None
        if remembered is not None and time.monotonic() - remembered[0] < TOTAL_TTL:
            rows = await self.db.fetch_prepared(self._page_sql(where), [*params, limit, offset])
            return remembered[1], [(r[0], r[1]) for r in rows]
        a = self.alias
        # The count is the left side of a lateral join, so an offset past the end still yields
        # one row carrying the total, with NULLs where the page would be.
        sql = (
            f"SELECT c.total, page.* FROM"  # noqa: S608 - fragments are constants of this package
            f" (SELECT count(*) AS total FROM {self.table} {a} WHERE {where}) c"
            f" LEFT JOIN LATERAL ({self._page_sql(where, ordered=True)}) page ON true"
            " ORDER BY page._at, page._id"
        )
        rows = await self.db.fetch_prepared(sql, [*params, *params, limit, offset])
        total = rows[0][0] if rows else 0
        if key is not None and generation == self.generation:
            self.totals[key] = (time.monotonic(), total)
        return total, [(r[1], r[2]) for r in rows if r[1] is not None]

    def _page_sql(self, where: str, *, ordered: bool = False) -> str:
        a = self.alias
        extra = f", {a}.created_at AS _at, {a}.uuid AS _id" if ordered else ""
        return (
            f"SELECT {self.json} AS json, {self.link_column} AS link{extra}"  # noqa: S608
            f" FROM {self.from_} WHERE {where}"
            f" ORDER BY {a}.created_at, {a}.uuid LIMIT %s OFFSET %s"
        )

    def _total_key(self, filters: Mapping[str, Any]) -> tuple[Any, ...] | None:
        if not set(filters) <= self.remembered:
            return None
        return tuple(sorted(filters.items()))

    async def get(self, uuid: uuid_module.UUID) -> dict[str, Any] | None:
        """One item, or None when no item has that UUID."""
        items = await self.get_many([uuid])
        return items[0] if items else None

    async def get_many(self, uuids: Sequence[uuid_module.UUID]) -> list[dict[str, Any]]:
        """The items with these UUIDs, in the order given (missing ones left out)."""
        sql = (
            f"SELECT {self.alias}.uuid, {self.json}, {self.link_column}"  # noqa: S608
            f" FROM {self.from_} WHERE {self.alias}.uuid = ANY(%s::uuid[])"
        )
        rows = await self.db.fetch_prepared(sql, [list(uuids)])
        by_id = {row[0]: orjson.loads(self.finish(row[1], row[2])) for row in rows}
        return [by_id[u] for u in uuids if u in by_id]

    def _where(self, filters: Mapping[str, Any]) -> tuple[str, list[Any]]:
        conditions, params = [], []
        for name, value in filters.items():
            conditions.append(self.filters[name])
            params.append(value)
        return " AND ".join(conditions) or "true", params
