"""Entry point: `satchel serve` runs the server, `satchel migrate` applies migrations."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import tornado.httpserver

from server import logs
from server.app import build_services, make_app
from server.config import ConfigError, Settings
from storage.db import Database
from storage.migrate import migrate
from storage.s3 import ObjectStore

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


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop in order: accepting, requests, pools."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    async with contextlib.AsyncExitStack() as stack:
        db = Database(settings.database_url)
        await db.start()
        stack.push_async_callback(db.stop)
        objects = object_store(settings)
        await stack.enter_async_context(objects.running())
        services = build_services(settings, db, objects)
        server = tornado.httpserver.HTTPServer(
            make_app(services), xheaders=False, max_body_size=64 * 1024 * 1024
        )
        server.listen(settings.port, settings.host)
        log.info("serving on http://%s:%d", settings.host, settings.port)
        await stopping.wait()
        log.info("shutting down")
        server.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.close_all_connections(), REQUEST_GRACE)


def cli(argv: list[str] | None = None) -> int:
    """`satchel serve` or `satchel migrate`."""
    parser = argparse.ArgumentParser(prog="satchel")
    parser.add_argument("command", choices=("serve", "migrate"))
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"satchel: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "migrate":
        applied = migrate(settings.database_url)
        log.info("migrations applied: %s", applied or "none needed")
        return 0
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
