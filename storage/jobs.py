"""Archive runs in PostgreSQL: the queue, the per-task run lock, and fenced progress writes.

The queue is the task table itself (waiting = initialized, or processing with no live run).
A run holds a session advisory lock on a connection of its own, so the lock dies with the
process or its connection; and every write of a run names the run's epoch, so a run that lost
its lock without noticing writes nothing once another run has taken the task over.
"""

from __future__ import annotations

import logging
import uuid as uuid_module
from dataclasses import dataclass
from typing import Any

import psycopg

from storage.db import Database, dedicated_connection
from storage.outbox import Event, recording

log = logging.getLogger("satchel.jobs")

# Server-side keepalives on the lock connection: PostgreSQL drops the session of a vanished
# instance (and so its locks) within about 5 + 3 * 3 = 14 s, well inside the 30 s takeover.
_LOCK_SESSION = (
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 3; SET tcp_keepalives_count = 3"
)


class Fenced(Exception):
    """The task has moved on to another epoch: this run must stop and write nothing."""


def lock_key(task_id: uuid_module.UUID) -> int:
    """The advisory lock key of a task: its UUID's first 64 bits, as a signed bigint."""
    return int.from_bytes(task_id.bytes[:8], "big", signed=True)


class RunLock:
    """A session advisory lock on a dedicated connection, held for one run's lifetime."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    @classmethod
    async def try_acquire(cls, url: str, task_id: uuid_module.UUID) -> RunLock | None:
        """The task's run lock, or None when a live run elsewhere holds it."""
        conn = await dedicated_connection(url, name="satchel-run-lock", keepalive_idle=5)
        try:
            await conn.execute(_LOCK_SESSION)
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", [lock_key(task_id)])
            row = await cur.fetchone()
        except BaseException:
            await conn.close()
            raise
        if row and row[0]:
            return cls(conn)
        await conn.close()
        return None

    async def release(self) -> None:
        """Closing the session releases the lock, even if the connection is already broken."""
        await self.conn.close()


@dataclass(frozen=True)
class RunStart:
    """What a run needs, read as it takes the task."""

    task_id: uuid_module.UUID
    project_id: uuid_module.UUID
    epoch: int
    urls: list[str]
    previous_upload: tuple[int, str] | None  # (epoch, upload id) of a run that died


class JobStore:
    """The queries of archive runs; every write is fenced by the run's epoch."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def candidates(self, limit: int) -> list[uuid_module.UUID]:
        """The oldest tasks that want a run (some may be running elsewhere)."""
        rows = await self.db.fetchall(
            "SELECT uuid FROM task WHERE status IN ('initialized', 'processing')"
            " ORDER BY created_at, uuid LIMIT %s",
            [limit],
        )
        return [row[0] for row in rows]

    async def waiting(self) -> int:
        """How many tasks want a run."""
        row = await self.db.fetchone(
            "SELECT count(*) FROM task WHERE status IN ('initialized', 'processing')"
        )
        return int(row[0]) if row else 0

    async def begin(self, task_id: uuid_module.UUID) -> RunStart | None:
        """Take the task (the caller holds its run lock): new epoch, `processing`, progress 0."""
        async with self.db.transaction():
            old = await self.db.fetchone(
                "SELECT project_id, status::text, progress, error, epoch, upload_id FROM task"
                " WHERE uuid = %s AND status IN ('initialized', 'processing') FOR UPDATE",
                [task_id],
            )
            if old is None:
                return None
            project_id, status, progress, error, epoch, upload_id = old
            async with recording(self.db, [project_id]) as events:
                row = await self.db.fetchone(
                    "UPDATE task SET status = 'processing', progress = 0, error = NULL,"
                    " upload_id = NULL, epoch = epoch + 1, updated_at = clock_timestamp()"
                    " WHERE uuid = %s RETURNING epoch, urls",
                    [task_id],
                )
                assert row is not None
                changed = [
                    name
                    for name, was, now in (
                        ("status", status, "processing"),
                        ("progress", progress, 0),
                        ("error", error, None),
                    )
                    if was != now
                ]
                if changed:
                    events.append(Event("task.updated", project_id, task_id, changed))
        previous = (epoch, upload_id) if upload_id else None
        return RunStart(task_id, project_id, row[0], list(row[1]), previous)

    async def remember_orphan(self, key: str, upload_id: str) -> None:
        """Keep an upload whose abort S3 did not confirm, to abort it later."""
        await self.db.execute(
            "INSERT INTO orphan_upload (upload_id, key) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            [upload_id, key],
        )

    async def orphans(self, limit: int = 20) -> list[tuple[str, str]]:
        """(key, upload id) of uploads still to abort, oldest first."""
        rows = await self.db.fetchall(
            "SELECT key, upload_id FROM orphan_upload ORDER BY since LIMIT %s", [limit]
        )
        return [(row[0], row[1]) for row in rows]

    async def forget_orphan(self, upload_id: str) -> None:
        """The upload is confirmed gone."""
        await self.db.execute("DELETE FROM orphan_upload WHERE upload_id = %s", [upload_id])

    async def set_upload(self, run: RunStart, upload_id: str | None) -> None:
        """Remember the run's multipart upload, so a takeover can abort it."""
        count = await self.db.execute(
            "UPDATE task SET upload_id = %s WHERE uuid = %s AND epoch = %s",
            [upload_id, run.task_id, run.epoch],
        )
        if not count:
            raise Fenced()

    async def check(self, run: RunStart) -> None:
        """Raise Fenced unless the run still owns the task."""
        row = await self.db.fetchone(
            "SELECT 1 FROM task WHERE uuid = %s AND epoch = %s", [run.task_id, run.epoch]
        )
        if row is None:
            raise Fenced()

    async def progress(self, run: RunStart, value: int) -> None:
        """Write a higher progress value (below 100)."""
        await self._write(
            run,
            "task.updated",
            ["progress"],
            "progress = %s WHERE uuid = %s AND epoch = %s AND progress < %s",
            [value, run.task_id, run.epoch, value],
        )

    async def finish(self, run: RunStart, key: str) -> None:
        """The archive is stored and verified: `finished`, 100, and its key."""
        await self._write(
            run,
            "task.archived",
            ["status", "progress", "archive_url"],
            "status = 'finished', progress = 100, archive_key = %s, upload_id = NULL"
            " WHERE uuid = %s AND epoch = %s",
            [key, run.task_id, run.epoch],
        )

    async def fail(self, run: RunStart, error: str) -> None:
        """The run failed for a reason the client should read."""
        await self._write(
            run,
            "task.updated",
            ["status", "error"],
            "status = 'failed', error = %s, upload_id = NULL WHERE uuid = %s AND epoch = %s",
            [error[:1000], run.task_id, run.epoch],
        )

    async def _write(
        self, run: RunStart, kind: str, changed: list[str], assignment: str, params: list[Any]
    ) -> None:
        async with self.db.transaction(), recording(self.db, [run.project_id]) as events:
            count = await self.db.execute(
                "UPDATE task SET updated_at = clock_timestamp(), " + assignment,  # noqa: S608
                params,
            )
            if not count:
                await self.check(run)
                return
            events.append(Event(kind, run.project_id, run.task_id, changed))
