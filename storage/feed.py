"""The event feed of one instance: one LISTEN connection, new outbox rows read in id order and
handed to in-process subscribers; a dropped connection reconnects and catches up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from storage.db import Database, dedicated_connection
from storage.outbox import CHANNEL

log = logging.getLogger("satchel.feed")
# A reconnect attempt at most this often while the database is away.
RECONNECT_DELAY = 0.5
# Rows read per query while catching up.
BATCH = 500
# Pruning runs this often (every instance; deleting is idempotent).
PRUNE_INTERVAL = 60.0
_COLUMNS = "id, type, task_id::text, project_id::text, changed, payload, created_at"


@dataclass(frozen=True)
class StoredEvent:
    """One outbox row."""

    id: int
    type: str
    task_id: str | None
    project_id: str
    changed: list[str]
    payload: dict[str, Any]
    created_at: float  # epoch seconds of the commit-side insert, for the lag metric


def _event(row: tuple[Any, ...]) -> StoredEvent:
    payload = row[5] if isinstance(row[5], dict) else json.loads(row[5])
    return StoredEvent(row[0], row[1], row[2], row[3], list(row[4]), payload, row[6].timestamp())


class EventFeed:
    """Delivers every committed event, in id order, to each subscriber callback."""

    def __init__(self, db: Database, *, retention: int, metrics: Any = None) -> None:
        self.db = db
        self.retention = retention
        self.metrics = metrics
        self.last_id = 0
        self.subscribers: set[Callable[[StoredEvent], None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._wake = asyncio.Event()
        self._ready = False

    def start(self) -> None:
        """Listen and prune in the background."""
        self._tasks = [
            asyncio.ensure_future(self._listen()),
            asyncio.ensure_future(self._pump()),
            asyncio.ensure_future(self._prune_forever()),
        ]

    async def stop(self) -> None:
        """Stop listening."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._conn is not None:
            await self._conn.close()

    async def replay(self, since: int, until: int) -> list[StoredEvent] | None:
        """Events after `since` up to `until`; None when `since` is older than the history."""
        horizon = await self.db.fetchone("SELECT pruned_through FROM event_horizon")
        if horizon is not None and since < horizon[0]:
            return None
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM event WHERE id > %s AND id <= %s ORDER BY id",  # noqa: S608
            [since, until],
        )
        return [_event(row) for row in rows]

    async def _listen(self) -> None:
        while True:
            try:
                await self._listen_once()
            except (psycopg.Error, OSError) as exc:
                log.warning("event listener lost its connection: %s", exc)
                if self.metrics is not None:
                    self.metrics.listener_reconnects.inc()
            self._conn = None
            await asyncio.sleep(RECONNECT_DELAY)

    async def _listen_once(self) -> None:
        conn = await dedicated_connection(self.db.url, name="satchel-listener")
        self._conn = conn
        async with conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            if not self._ready:
                cur = await conn.execute("SELECT coalesce(max(id), 0) FROM event")
                row = await cur.fetchone()
                self.last_id = int(row[0]) if row else 0
            self._ready = True
            # Catch up on whatever committed while we were not listening.
            self._wake.set()
            async for _notify in conn.notifies():
                self._wake.set()

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._read_new()
            except Exception as exc:
                log.warning("reading new events failed: %s", exc)
                await asyncio.sleep(RECONNECT_DELAY)
                self._wake.set()

    async def _read_new(self) -> None:
        while self._ready:
            rows = await self.db.fetchall(
                f"SELECT {_COLUMNS} FROM event WHERE id > %s ORDER BY id LIMIT %s",  # noqa: S608
                [self.last_id, BATCH],
            )
            for row in rows:
                event = _event(row)
                self.last_id = event.id
                self._deliver(event)
            if len(rows) < BATCH:
                return

    def _deliver(self, event: StoredEvent) -> None:
        if self.metrics is not None:
            self.metrics.event_lag.observe(max(0.0, time.time() - event.created_at))
        for subscriber in list(self.subscribers):
            subscriber(event)

    async def _prune_forever(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.prune()
            await asyncio.sleep(PRUNE_INTERVAL)

    async def prune(self) -> None:
        """Delete events older than the retention, and raise the horizon past them."""
        async with self.db.transaction():
            row = await self.db.fetchone(
                "WITH gone AS (DELETE FROM event"
                " WHERE created_at < clock_timestamp() - %s * interval '1 second' RETURNING id)"
                " SELECT max(id) FROM gone",
                [self.retention],
            )
            if row is not None and row[0] is not None:
                await self.db.execute(
                    "UPDATE event_horizon SET pruned_through = greatest(pruned_through, %s)",
                    [row[0]],
                )
