"""Tasks: reads with their project embedded, and atomic batch writes that keep the price rule.

The rule: the prices of a project's tasks never add up to more than the project's price. Every
batch locks the rows of the projects it touches, in UUID order, before it reads their sums, so
concurrent batches on one project run one after another and none can slip past the check.
"""

from __future__ import annotations

import json
import uuid as uuid_module
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson

from storage.db import Database
from storage.errors import ValidationFailed
from storage.feed import StoredEvent
from storage.outbox import Event, recording
from storage.store import Store
from storage.views import TASK_FROM, TASK_JSON, LinkMaker

# Field -> messages, per batch index (as a string), the shape of the contract's `errors`.
Errors = dict[str, dict[str, Any]]
UPDATABLE = ("name", "description", "estimate_date", "price", "urls")
# What a new list of URLs resets, and the values it resets them to.
RESET = {"status": "initialized", "progress": 0, "archive_key": None, "error": None}


class TaskStore(Store):
    """Tasks with their project (and its aggregates) embedded."""

    table = "task"
    alias = "t"
    json = TASK_JSON
    from_ = TASK_FROM
    link_column = "t.archive_key"
    filters = {"project_id": "t.project_id = %s", "status": "t.status = %s"}
    # Per-project counts are cheap (an index range); whole-table ones are remembered.
    remembered = frozenset({"status"})

    def __init__(self, db: Database, link: LinkMaker, **options: Any) -> None:
        super().__init__(db, **options)
        self.link = link

    def finish(self, text: str, key: str | None) -> str:
        """The task's JSON, with its archive link signed afresh when it has an archive."""
        if key is None:
            return text
        task = orjson.loads(text)
        task["archive_url"] = self.link(key)
        return orjson.dumps(task).decode()

    def on_event(self, event: StoredEvent) -> None:
        """New tasks and status changes (from any instance) change the totals too."""
        super().on_event(event)
        if event.type == "task.created" or "status" in event.changed:
            self.forget_totals()

    async def create_batch(
        self, items: Sequence[Mapping[str, Any] | None], errors: Errors
    ) -> list[dict[str, Any]]:
        """Insert every item or none; `None` items already failed validation (in `errors`)."""
        async with self.db.transaction():
            prices = await self._lock_projects({i["project_id"] for i in items if i})
            sums = await self._price_sums(prices)
            for index, item in enumerate(items):
                if item and item["project_id"] not in prices:
                    _add(errors, index, "project_id", "Project not found.")
            changes = [(i, item, item.get("price")) for i, item in enumerate(items) if item]
            _check_prices(changes, prices, sums, {}, errors)
            _raise_if_invalid(errors, len(items))
            # The events are recorded last before COMMIT: the event lock serialises writers.
            async with recording(self.db, prices) as events:
                created = await self._insert(items)
                events += [Event("task.created", project, task) for task, project in created]
                tasks = await self.get_many([task for task, _ in created])
        self.forget_totals()
        return tasks

    async def update_batch(
        self, items: Sequence[Mapping[str, Any] | None], errors: Errors
    ) -> list[dict[str, Any]]:
        """Apply every item or none; only the given fields change, `None` clears a field."""
        _flag_repeated_ids(items, errors)
        async with self.db.transaction():
            ids = [item["task_id"] for item in items if item]
            owners = await self._owners(ids)
            prices = await self._lock_projects(set(owners.values()))
            current = await self._lock_tasks(owners)
            sums = await self._price_sums(prices)
            for index, item in enumerate(items):
                if item and item["task_id"] not in current:
                    _add(errors, index, "task_id", "Task not found.")
            changes = [
                (i, {"project_id": owners[item["task_id"]], **item}, item.get("price"))
                for i, item in enumerate(items)
                if item and item["task_id"] in current and "price" in item
            ]
            old = {i: current[items[i]["task_id"]]["price"] for i, _, _ in changes}  # type: ignore[index]
            _check_prices(changes, prices, sums, old, errors)
            _raise_if_invalid(errors, len(items))
            rows = [_merged(current[item["task_id"]], item) for item in items if item]
            async with recording(self.db, prices) as events:
                await self._update(rows)
                events += [
                    Event("task.updated", owners[row["uuid"]], row["uuid"], row["changed"])
                    for row in rows
                    if row["changed"]
                ]
                tasks = await self.get_many(ids)
        self.forget_totals()
        return tasks

    async def _lock_projects(
        self, ids: Iterable[uuid_module.UUID]
    ) -> dict[uuid_module.UUID, Decimal]:
        """Lock the projects' rows in a fixed order; return the price of each that exists."""
        wanted = sorted(str(i) for i in ids)
        if not wanted:
            return {}
        rows = await self.db.fetchall(
            "SELECT uuid, price FROM project WHERE uuid = ANY(%s::uuid[])"
            " ORDER BY uuid FOR NO KEY UPDATE",
            [wanted],
        )
        return {row[0]: row[1] for row in rows}

    async def _price_sums(
        self, prices: Mapping[uuid_module.UUID, Decimal]
    ) -> dict[uuid_module.UUID, Decimal]:
        if not prices:
            return {}
        rows = await self.db.fetchall(
            "SELECT project_id, coalesce(sum(price), 0) FROM task"
            " WHERE project_id = ANY(%s::uuid[]) GROUP BY project_id",
            [[str(p) for p in prices]],
        )
        return defaultdict(Decimal, {row[0]: row[1] for row in rows})

    async def _owners(
        self, ids: Sequence[uuid_module.UUID]
    ) -> dict[uuid_module.UUID, uuid_module.UUID]:
        # A task never moves between projects, so its owner can be read before any lock.
        if not ids:
            return {}
        rows = await self.db.fetchall(
            "SELECT uuid, project_id FROM task WHERE uuid = ANY(%s::uuid[])",
            [[str(i) for i in ids]],
        )
        return {row[0]: row[1] for row in rows}

    async def _lock_tasks(
        self, owners: Mapping[uuid_module.UUID, uuid_module.UUID]
    ) -> dict[uuid_module.UUID, dict[str, Any]]:
        if not owners:
            return {}
        keys = ("uuid", *UPDATABLE, *RESET)
        rows = await self.db.fetchall(
            f"SELECT {', '.join(keys)} FROM task"  # noqa: S608 - constant column names
            " WHERE uuid = ANY(%s::uuid[]) ORDER BY uuid FOR UPDATE",
            [sorted(str(i) for i in owners)],
        )
        return {row[0]: dict(zip(keys, row, strict=True)) for row in rows}

    async def _insert(
        self, items: Sequence[Mapping[str, Any] | None]
    ) -> list[tuple[uuid_module.UUID, uuid_module.UUID]]:
        """Insert the items; return (task, project) ids in input order."""
        records = [
            {
                "ord": index,
                "project_id": str(item["project_id"]),
                "name": item["name"],
                "description": item.get("description"),
                "estimate_date": _text(item.get("estimate_date")),
                "price": _text(item.get("price")),
                "urls": item["urls"],
            }
            for index, item in enumerate(items)
            if item
        ]
        # One clock reading for the batch, a microsecond apart per item: the batch lists in
        # its input order, since pages are ordered by created_at.
        rows = await self.db.fetchall(
            "INSERT INTO task (project_id, name, description, estimate_date, price, urls,"
            " created_at, updated_at)"
            " SELECT v.project_id, v.name, v.description, v.estimate_date, v.price, v.urls,"
            "  c.at + v.ord * interval '1 microsecond', c.at + v.ord * interval '1 microsecond'"
            " FROM (SELECT clock_timestamp() AS at) c, jsonb_to_recordset(%s::jsonb) AS v("
            "  ord integer, project_id uuid, name text, description text, estimate_date date,"
            "  price numeric, urls text[])"
            " RETURNING uuid, project_id, created_at",
            [json.dumps(records)],
        )
        return [(row[0], row[1]) for row in sorted(rows, key=lambda row: row[2])]

    async def _update(self, rows: Sequence[Mapping[str, Any]]) -> None:
        records = [
            {
                **row,
                "changed": bool(row["changed"]),
                "uuid": str(row["uuid"]),
                "estimate_date": _text(row["estimate_date"]),
                "price": _text(row["price"]),
            }
            for row in rows
        ]
        # A new list of URLs is a new archive: back to the start, and a new epoch fences off
        # any run still forming the old one.
        await self.db.execute(
            "UPDATE task t SET name = v.name, description = v.description,"
            " estimate_date = v.estimate_date, price = v.price, urls = v.urls,"
            " status = CASE WHEN v.urls_changed THEN 'initialized' ELSE t.status END,"
            " progress = CASE WHEN v.urls_changed THEN 0 ELSE t.progress END,"
            " archive_key = CASE WHEN v.urls_changed THEN NULL ELSE t.archive_key END,"
            " error = CASE WHEN v.urls_changed THEN NULL ELSE t.error END,"
            " epoch = CASE WHEN v.urls_changed THEN t.epoch + 1 ELSE t.epoch END,"
            " updated_at = clock_timestamp()"
            " FROM jsonb_to_recordset(%s::jsonb) AS v(uuid uuid, name text, description text,"
            "  estimate_date date, price numeric, urls text[], urls_changed boolean,"
            "  changed boolean)"
            " WHERE t.uuid = v.uuid AND v.changed",
            [json.dumps(records)],
        )


def _merged(current: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
    """The row after applying `item`, with the public names of the fields that change."""
    row = {key: item.get(key, current[key]) for key in UPDATABLE}
    row["uuid"] = current["uuid"]
    row["urls_changed"] = row["urls"] != current["urls"]
    changed = [key for key in UPDATABLE if row[key] != current[key]]
    if row["urls_changed"]:
        changed += [key for key, value in RESET.items() if current[key] != value]
    row["changed"] = [("archive_url" if key == "archive_key" else key) for key in changed]
    return row


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _add(errors: Errors, index: int, field: str, message: str) -> None:
    errors.setdefault(str(index), {}).setdefault(field, []).append(message)


def _flag_repeated_ids(items: Sequence[Mapping[str, Any] | None], errors: Errors) -> None:
    seen: dict[uuid_module.UUID, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        if item:
            seen[item["task_id"]].append(index)
    for indexes in seen.values():
        for index in indexes if len(indexes) > 1 else ():
            others = ", ".join(str(i) for i in indexes if i != index)
            _add(errors, index, "task_id", f"The same task_id appears again at index {others}.")


def _check_prices(
    changes: Sequence[tuple[int, Mapping[str, Any], Decimal | None]],
    prices: Mapping[uuid_module.UUID, Decimal],
    sums: Mapping[uuid_module.UUID, Decimal],
    old: Mapping[int, Decimal | None],
    errors: Errors,
) -> None:
    """Report the price of every priced item of a project whose task prices would pass its own."""
    totals = dict(sums)
    priced: dict[uuid_module.UUID, list[int]] = defaultdict(list)
    for index, item, price in changes:
        project = item["project_id"]
        if project not in prices:
            continue
        totals[project] = totals.get(project, Decimal(0)) - (old.get(index) or 0) + (price or 0)
        if price is not None:
            priced[project].append(index)
    for project, indexes in priced.items():
        if totals[project] > prices[project]:
            message = (
                f"Sum of task prices ({totals[project]:.2f}) exceeds project price"
                f" ({prices[project]:.2f})."
            )
            for index in indexes:
                _add(errors, index, "price", message)


def _raise_if_invalid(errors: Errors, count: int) -> None:
    if errors:
        noun = "task is" if count == 1 else "tasks are"
        raise ValidationFailed(f"{len(errors)} of {count} {noun} invalid", errors=errors)
