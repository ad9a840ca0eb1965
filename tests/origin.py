"""A loopback file server for archive tests: serves given bodies, counts requests, can stall."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import tornado.httpserver
import tornado.web


@dataclass
class FileSpec:
    """One served file."""

    body: bytes
    content_type: str = "application/octet-stream"
    status: int = 200
    delay_per_chunk: float = 0.0  # seconds between 64 KiB chunks: makes a run take a while
    raw: bytes | None = None  # a whole raw HTTP response, for misbehaving on purpose
    stall: float = 0.0  # after `raw`, keep the connection open this long before closing
    fail_first: int = 0  # answer 503 to this many requests first


@dataclass
class Origin:
    """The server's files, the requests it got, and its base URL."""

    files: dict[str, FileSpec] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    url: str = ""


class _FileHandler(tornado.web.RequestHandler):
    def initialize(self, origin: Origin) -> None:
        self.origin = origin

    async def get(self, path: str) -> None:
        self.origin.hits[path] += 1
        spec = self.origin.files.get(path)
        if spec is None:
            raise tornado.web.HTTPError(404)
        if self.origin.hits[path] <= spec.fail_first:
            raise tornado.web.HTTPError(503)
        if spec.raw is not None:
            stream = self.request.connection.detach()  # type: ignore[union-attr]
            await stream.write(spec.raw)
            await asyncio.sleep(spec.stall)
            stream.close()
            return
        self.set_status(spec.status)
        self.set_header("Content-Type", spec.content_type)
        self.set_header("Content-Length", str(len(spec.body)))
        for start in range(0, len(spec.body), 65536):
            self.write(spec.body[start : start + 65536])
            await self.flush()
            if spec.delay_per_chunk:
                await asyncio.sleep(spec.delay_per_chunk)


async def start_origin() -> tuple[Origin, tornado.httpserver.HTTPServer]:
    """Start an origin on a free loopback port."""
    origin = Origin()
    app = tornado.web.Application([(r"/(.*)", _FileHandler, {"origin": origin})])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([sock])
    origin.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    return origin, server


def allow(origin: Origin) -> tuple[str, ...]:
    """The FETCH_ALLOWLIST entry that opens this origin."""
    return (origin.url.removeprefix("http://"),)


async def stop_origin(server: Any) -> None:
    """Stop the origin."""
    server.stop()
    await server.close_all_connections()
