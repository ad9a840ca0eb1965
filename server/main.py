"""Entry point: `satchel serve` runs the server, `satchel migrate` applies migrations."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import tornado.httpserver

from handlers.base import DISCARD_LIMIT
from server import logs, worker
from server.app import Services, build_services, make_app
from server.config import ConfigError, Settings
from server.metrics import ARCHIVE_METRICS, WORKER_METRICS
from server.worker import WorkerProcess
from storage.db import Database
from storage.feed import StoredEvent
from storage.migrate import migrate
from storage.multipart import ensure_bucket, part_size_for
from storage.s3 import ObjectStore
from tasks.fetcher import FetchPolicy
from tasks.runner import Runner, RunnerConfig

log = logging.getLogger("satchel.server")
# Time in-flight requests get to finish once the server stops accepting.
REQUEST_GRACE = 10.0


def object_store(settings: Settings) -> ObjectStore:
    """The object store described by `settings`."""
    return ObjectStore(
        bucket=settings.s3_bucket,
        region=settings.s3_region,
        endpoint_url=settings.s3_endpoint_url,
        link_ttl=settings.archive_url_ttl,
        public_base_url=settings.archive_public_base_url,
    )


def fetch_policy(settings: Settings) -> FetchPolicy:
    """How archive jobs may download, from `settings`."""
    return FetchPolicy(allowlist=settings.fetch_allowlist, max_file_bytes=settings.max_file_bytes)


@contextlib.asynccontextmanager
async def storage(
    settings: Settings, *, pool_max: int = 20
) -> AsyncIterator[tuple[Database, ObjectStore]]:
    """The database pool and the object store (its bucket made sure of in the background)."""
    async with contextlib.AsyncExitStack() as stack:
        db = Database(settings.database_url, min_size=min(2, pool_max), max_size=pool_max)
        await db.start()
        stack.push_async_callback(db.stop)
        objects = object_store(settings)
        await stack.enter_async_context(objects.running())
        stack.push_async_callback(_ensure_bucket_later(objects, settings))
        yield db, objects


def archive_runner(settings: Settings, db: Database, objects: ObjectStore, metrics: Any) -> Runner:
    """The archive runner `settings` describe."""
    return Runner(
        db=db,
        objects=objects,
        policy=fetch_policy(settings),
        config=RunnerConfig(
            concurrency=settings.job_concurrency,
            max_archive_bytes=settings.max_archive_bytes,
            part_size=part_size_for(settings.max_archive_bytes),
        ),
        metrics=metrics,
    )


@contextlib.asynccontextmanager
async def running(settings: Settings, *, archives: bool = True) -> AsyncIterator[Services]:
    """Everything but the HTTP listener: pools, S3, event feed and (with `archives`) the runner.

    Each piece registers its own shutdown where it is created, so leaving the block stops them
    in reverse: the runner drains first, then the feed, then S3 and the database pool.
    """
    async with contextlib.AsyncExitStack() as stack:
        db, objects = await stack.enter_async_context(storage(settings))
        services = build_services(settings, db, objects)
        # Read at every scrape, so the gauge can never lag behind the pool's own view.
        services.metrics.db_up.set_function(lambda: float(db.available))
        for store in services.stores.values():
            services.feed.subscribers.add(store.on_event)
        services.feed.subscribers.add(services.hub.deliver)
        services.feed.start()
        stack.push_async_callback(services.feed.stop)
        if archives:
            services.metrics.drop(*WORKER_METRICS)
            runner = archive_runner(settings, db, objects, services.metrics)
            services.runner = runner
            services.feed.subscribers.add(lambda event: runner.wake() if wants_run(event) else None)
            runner.start()
            stack.push_async_callback(runner.stop, settings.drain_timeout)
        else:
            # The archives are formed in a worker process, which exports these itself.
            services.metrics.drop(*ARCHIVE_METRICS)
            services.worker = WorkerProcess(settings, services.metrics)
            services.runner = services.worker
            services.worker.start()
            stack.push_async_callback(services.worker.stop, settings.drain_timeout)
        yield services


def settle_heap() -> None:
    """Keep the garbage collector off the objects made at start-up.

    Imports (botocore's service models above all) leave a few hundred thousand long-lived
    objects; a full collection walks all of them, pausing the event loop for tens of ms under
    load. Frozen, they are never scanned again.
    """
    gc.collect()
    gc.freeze()


def wants_run(event: StoredEvent) -> bool:
    """Whether an event (from any instance) may have put a task in the archive queue."""
    return event.type == "task.created" or "urls" in event.changed


def _ensure_bucket_later(objects: ObjectStore, settings: Settings) -> Any:
    """Create the bucket in the background (S3 may come up after us); nothing to undo."""
    task = asyncio.ensure_future(_ensure_bucket(objects, settings))

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return cancel


async def _ensure_bucket(objects: ObjectStore, settings: Settings) -> None:
    while True:
        try:
            await ensure_bucket(objects.client, objects.bucket, region=settings.s3_region)
            return
        except Exception as exc:
            log.warning("cannot make sure the bucket exists yet: %s", exc)
            await asyncio.sleep(5)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop in order: accepting, archives, sockets, pools."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await _serve_until(settings, stopping)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _serve_until(settings: Settings, stopping: asyncio.Event) -> None:
    in_process = settings.archive_worker == "inline" or settings.job_concurrency == 0
    async with running(settings, archives=in_process) as services:
        server = tornado.httpserver.HTTPServer(make_app(services), max_body_size=DISCARD_LIMIT)
        settle_heap()
        server.listen(settings.port, settings.host)
        log.info("serving on http://%s:%d", settings.host, settings.port)
        await stopping.wait()
        log.info("shutting down")
        server.stop()
        await services.runner.stop(settings.drain_timeout)
        for socket in list(services.sockets):
            socket.close(1001, "server shutting down")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.close_all_connections(), REQUEST_GRACE)


def cli(argv: list[str] | None = None) -> int:
    """`satchel serve`, `satchel work` (archives only) or `satchel migrate`."""
    parser = argparse.ArgumentParser(prog="satchel")
    parser.add_argument("command", choices=("serve", "work", "migrate"))
    args = parser.parse_args(argv)
    try:
        if args.command == "work" and worker.SETTINGS_ENV in os.environ:
            settings = worker.decode_settings(os.environ[worker.SETTINGS_ENV])
            worker.become_child(settings)
        else:
            settings = Settings.from_env()
    except ConfigError as exc:
        print(f"satchel: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "migrate":
        applied = migrate(settings.database_url)
        log.info("migrations applied: %s", applied or "none needed")
        return 0
    if args.command == "work":
        asyncio.run(worker.work(settings))
    else:
        asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
