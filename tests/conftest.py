"""Test session: a throwaway PostgreSQL cluster and moto S3, and apps on random ports."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
from aiobotocore.session import get_session

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

from server.app import Services, make_app
from server.config import Settings
from server.devenv import LocalServices, local_services
from server.main import running
from storage.db import Database
from storage.migrate import migrate


@pytest.fixture(scope="session")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    """PostgreSQL (migrated) and moto S3, for the whole session."""
    with local_services(tmp_path_factory.mktemp("services"), durable=False) as found:
        migrate(found.database_url)
        yield found


@pytest.fixture(scope="session")
def settings(local: LocalServices) -> Settings:
    """Settings pointing at the session's services; no archive runs unless a test asks."""
    return Settings(
        database_url=local.database_url, s3_endpoint_url=local.s3_endpoint_url, job_concurrency=0
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Response:
    """What a client saw."""

    code: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


@dataclasses.dataclass
class Server:
    """A running app and a client for it."""

    url: str
    services: Services

    async def fetch(
        self,
        path: str,
        method: str = "GET",
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send one request; `body` is JSON-encoded unless `raw` is given."""
        headers = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        client = tornado.httpclient.AsyncHTTPClient()
        reply = await client.fetch(
            self.url + path,
            method=method,
            body=data,
            headers=headers,
            raise_error=False,
            follow_redirects=False,
            allow_nonstandard_methods=True,
            request_timeout=60,
        )
        return Response(reply.code, reply.headers, reply.body or b"")


@contextlib.asynccontextmanager
async def running_server(settings: Settings, *, archives: bool = True) -> AsyncIterator[Server]:
    """An app with its own pool and S3 client on a free port.

    With `archives=False` the archives are formed by a worker process, as `satchel serve` does.
    """
    async with running(settings, archives=archives) as services:
        server = tornado.httpserver.HTTPServer(make_app(services))
        port = _free_port()
        server.listen(port, "127.0.0.1")
        await _until_available(services.db)
        try:
            yield Server(url=f"http://127.0.0.1:{port}", services=services)
        finally:
            server.stop()
            await services.runner.stop(settings.drain_timeout)
            for socket_ in list(services.sockets):
                socket_.close(1001)
            await server.close_all_connections()


async def _until_available(db: Database) -> None:
    import asyncio

    for _ in range(200):
        if db.available:
            return
        await asyncio.sleep(0.02)
    raise RuntimeError("the test database did not become available")


@pytest.fixture(scope="session")
async def shared_server(settings: Settings) -> AsyncIterator[Server]:
    """One app for the whole session (most tests need nothing special)."""
    async with running_server(settings) as server:
        yield server


@pytest.fixture
async def app(shared_server: Server) -> Server:
    """The shared app over empty tables."""
    await shared_server.services.db.execute("TRUNCATE task, project CASCADE")
    for store in shared_server.services.stores.values():
        store.forget_totals()
    return shared_server


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def make_server(settings: Settings) -> AsyncIterator[ServerFactory]:
    """Start extra apps with settings overridden, stopped at the end of the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(*, archives: bool = True, **overrides: Any) -> Server:
            changed = dataclasses.replace(settings, **overrides)
            return await stack.enter_async_context(running_server(changed, archives=archives))

        yield start


@pytest.fixture
async def s3(local: LocalServices) -> AsyncIterator[Any]:
    """An aiobotocore client for the session's moto server."""
    async with get_session().create_client(
        "s3", endpoint_url=local.s3_endpoint_url, region_name="us-east-1"
    ) as client:
        yield client


@pytest.fixture
async def bucket(s3: Any) -> str:
    """A fresh bucket for one test."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    await s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def repo_root() -> Path:
    """The checkout's root."""
    return Path(__file__).resolve().parent.parent
