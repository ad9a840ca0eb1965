"""The bounded job runner: each instance forms at most `concurrency` archives at once.

The queue is PostgreSQL: the runner polls (and is woken on new tasks) for the oldest tasks that
want an archive, takes each under its run lock, and runs it in a fresh context so it never
shares a request's database connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import uuid as uuid_module
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from storage.db import Database, is_connection_error
from storage.jobs import JobStore, RunLock
from storage.multipart import UploadError, abort_upload
from storage.s3 import ObjectStore
from tasks.archive import ArchiveRun
from tasks.fetcher import Fetcher, FetchPolicy

log = logging.getLogger("satchel.runner")
# How often the queue is looked at when nothing wakes the runner; also the takeover delay for
# a run whose instance died (on top of PostgreSQL noticing the dead session).
POLL_INTERVAL = 2.0


@dataclass(frozen=True)
class RunnerConfig:
    """Limits of the runner."""

    concurrency: int
    max_archive_bytes: int
    part_size: int
    parts_in_flight: int = 3


class Runner:
    """Claims waiting tasks and runs their archives, at most `concurrency` at once."""

    def __init__(
        self,
        *,
        db: Database,
        objects: ObjectStore,
        policy: FetchPolicy,
        config: RunnerConfig,
        metrics: Any = None,
    ) -> None:
        self.db = db
        self.jobs = JobStore(db)
        self.objects = objects
        self.fetcher = Fetcher(policy)
        self.config = config
        self.metrics = metrics
        self.running: dict[uuid_module.UUID, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Begin claiming tasks."""
        if self.config.concurrency > 0:
            self._loop_task = _spawn(self._claim_loop())

    def wake(self) -> None:
        """Look at the queue now (new tasks, or a run ended)."""
        self._wake.set()

    async def stop(self, drain_timeout: float) -> None:
        """Stop claiming, give running archives `drain_timeout` to finish, cancel the rest."""
        if self._stopping:
            return
        self._stopping = True
        self.wake()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        runs = list(self.running.values())
        if runs:
            log.info("draining %d archive runs", len(runs))
            _done, pending = await asyncio.wait(runs, timeout=drain_timeout)
            for run in pending:
                run.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.fetcher.close()

    async def _claim_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                if self.db.available:
                    await self._abort_orphans()
                await self._claim()
            except Exception as exc:
                if not is_connection_error(exc):
                    log.exception("claiming archive runs failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)

    async def _abort_orphans(self) -> None:
        """Retry aborting uploads S3 could not confirm gone before."""
        for key, upload_id in await self.jobs.orphans():
            try:
                await abort_upload(self.objects.client, self.objects.bucket, key, upload_id)
            except (UploadError, ClientError, BotoCoreError, OSError):
                return  # S3 still away: try again on the next poll
            await self.jobs.forget_orphan(upload_id)

    async def _claim(self) -> None:
        if self.metrics is not None and self.db.available:
            self.metrics.tasks_waiting.set(await self.jobs.waiting())
        free = self.config.concurrency - len(self.running)
        if free <= 0 or not self.db.available:
            return
        for task_id in await self.jobs.candidates(limit=free + len(self.running) + 16):
            if free <= 0 or self._stopping:
                return
            if task_id in self.running:
                continue
            lock = await RunLock.try_acquire(self.db.url, task_id)
            if lock is None:
                continue
            self.running[task_id] = _spawn(self._run(task_id, lock))
            free -= 1
            self._gauge()

    async def _run(self, task_id: uuid_module.UUID, lock: RunLock) -> None:
        try:
            run = ArchiveRun(
                jobs=self.jobs,
                objects=self.objects,
                fetcher=self.fetcher,
                max_archive_bytes=self.config.max_archive_bytes,
                part_size=self.config.part_size,
                parts_in_flight=self.config.parts_in_flight,
                metrics=self.metrics,
            )
            await run.execute(task_id)
        except asyncio.CancelledError:
            log.info("archive run of %s cancelled", task_id)
            raise
        except Exception:
            log.exception("archive run of %s crashed", task_id)
        finally:
            await lock.release()
            self.running.pop(task_id, None)
            self._gauge()
            self.wake()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.runs_in_flight.set(len(self.running))


def _spawn(coro: Any) -> asyncio.Task[None]:
    """A background task in a fresh context: no request's database connection leaks in."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
