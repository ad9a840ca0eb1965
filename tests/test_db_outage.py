"""The database goes away: /health stays 200, the rest answers 503 fast, and it recovers alone.

The app reaches PostgreSQL through a TCP proxy this file runs, so a test can cut the database
off (close the listener, reset every open connection) and bring it back on the same port.
"""

import asyncio
import contextlib
import dataclasses
import json
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import tornado.httpclient
import tornado.httpserver
from api_helpers import MISSING_UUID, assert_problem, task_item

from server.app import make_app
from server.main import running

FAST = 1.0
# Building the app (S3 client included) takes a moment; waiting on the database would hang.
STARTUP = 5.0
RECOVERY = 15.0


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TcpProxy:
    """Forwards 127.0.0.1:port to a target until cut off."""

    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self.port = _free_port()
        self._server = None
        self._writers = set()

    async def open(self):
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self):
        """Stop accepting and reset every connection, as a crashed database host would."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def url(self, database_url):
        parts = urlsplit(database_url)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        return urlunsplit(
            parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host)
        )

    async def _serve(self, reader, writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        self._writers -= {writer, upstream_writer}


async def _pipe(reader, writer):
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


@contextlib.asynccontextmanager
async def proxy_for(settings):
    target = urlsplit(settings.database_url)
    proxy = TcpProxy(target.hostname, target.port)
    try:
        yield proxy
    finally:
        await proxy.cut()


@dataclasses.dataclass
class Reply:
    """What a client saw."""

    code: int
    headers: object
    body: bytes

    def json(self):
        return json.loads(self.body)


async def _fetch(url, path, method="GET", body=None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    started = time.monotonic()
    reply = await tornado.httpclient.AsyncHTTPClient().fetch(
        url + path,
        method=method,
        body=None if body is None else json.dumps(body),
        headers=headers,
        raise_error=False,
        request_timeout=30,
    )
    return Reply(reply.code, reply.headers, reply.body or b""), time.monotonic() - started


async def _assert_unavailable_fast(url, project_id):
    """Everything that needs the database answers 503 problem+json within FAST seconds."""
    requests = [
        ("GET", "/projects", None),
        ("POST", "/projects", {"name": "x", "price": 1}),
        ("GET", f"/projects/{project_id}", None),
        ("GET", "/tasks", None),
        ("GET", f"/tasks/{MISSING_UUID}", None),
        ("GET", f"/tasks/{MISSING_UUID}/archive", None),
        ("POST", "/tasks/batch_create", [task_item(project_id)]),
        ("POST", "/tasks/batch_update", [{"task_id": MISSING_UUID, "name": "x"}]),
    ]
    for method, path, body in requests:
        reply, took = await _fetch(url, path, method, body)
        assert took < FAST, (method, path, took)
        problem = assert_problem(reply, 503, "service_unavailable")
        assert problem["detail"]
    health, took = await _fetch(url, "/health")
    assert (health.code, took < FAST) == (200, True)
    ready, took = await _fetch(url, "/ready")
    assert ready.code == 503
    assert took < 5
    assert ready.json()["checks"]["database"] == "down"


async def _until_recovered(url, path="/projects"):
    deadline = time.monotonic() + RECOVERY
    while time.monotonic() < deadline:
        reply, _ = await _fetch(url, path)
        if reply.code == 200:
            return reply
        assert reply.code == 503, reply.body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} did not recover within {RECOVERY} s")


async def test_outage_answers_503_fast_and_recovers_by_itself(settings, make_server):
    async with proxy_for(settings) as proxy:
        await proxy.open()
        app = await make_server(database_url=proxy.url(settings.database_url))
        created, _ = await _fetch(app.url, "/projects", "POST", {"name": "kept", "price": 5})
        assert created.code == 201
        project = created.json()

        await proxy.cut()
        # The first request may be the one that finds the connection dead: still a fast 503.
        await _assert_unavailable_fast(app.url, project["uuid"])
        await asyncio.sleep(1.5)
        await _assert_unavailable_fast(app.url, project["uuid"])

        await proxy.open()
        page = await _until_recovered(app.url)
        assert [p["uuid"] for p in page.json()["items"]].count(project["uuid"]) == 1
        for _ in range(5):
            reply, _ = await _fetch(app.url, f"/projects/{project['uuid']}")
            assert reply.code == 200
        reply, _ = await _fetch(
            app.url, "/tasks/batch_create", "POST", [task_item(project["uuid"])]
        )
        assert reply.code == 201, reply.body
        ready, _ = await _fetch(app.url, "/ready")
        assert ready.code == 200


async def test_database_down_at_start_up(settings):
    async with proxy_for(settings) as proxy:
        down = dataclasses.replace(settings, database_url=proxy.url(settings.database_url))
        started = time.monotonic()
        async with running(down) as services:
            server = tornado.httpserver.HTTPServer(make_app(services))
            port = _free_port()
            server.listen(port, "127.0.0.1")
            url = f"http://127.0.0.1:{port}"
            try:
                assert time.monotonic() - started < STARTUP
                await _assert_unavailable_fast(url, MISSING_UUID)
                await proxy.open()
                await _until_recovered(url)
                reply, _ = await _fetch(url, "/projects", "POST", {"name": "late", "price": 1})
                assert reply.code == 201, reply.body
            finally:
                server.stop()
                await server.close_all_connections()
