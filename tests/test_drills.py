"""Failure drills: PostgreSQL cut while idle and under load, PostgreSQL down when `satchel serve`
starts, and S3 cut in the middle of an archive.

Each dependency is reached through a TCP proxy this file runs (as psycopg's own test suite
does): `cut()` stops accepting and resets every open connection, as a crashed host would;
`open()` brings it back on the same port. The proxy remembers the local port of every
connection it made upstream, so the test can find the app's own rows in pg_stat_activity.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import tornado.httpclient
from api_helpers import MISSING_UUID, create_project, task_item
from origin import FileSpec, Origin, allow, start_origin, stop_origin

# Every request while the database is away answers 503 within this.
FAST = 1.0
# Everything works again within this after the database returns.
RECOVERY = 5.0
# `satchel serve` imports boto and friends before it listens; it must not wait on PostgreSQL.
STARTUP = 15.0
MIB = 1024 * 1024
# botocore's retries (3 attempts, backoff under 2 s each) end well within this.
S3_GIVE_UP = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TcpProxy:
    """Forwards 127.0.0.1:port to `target` until cut off; closed until `open()`."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = _free_port()
        self.upstream_ports: set[int] = set()  # every connection ever made to the target
        self._server: asyncio.Server | None = None
        self._live: dict[asyncio.StreamWriter, int] = {}  # upstream writer -> its local port
        self._clients: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        """Accept and forward connections."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in [*self._live, *self._clients]:
            writer.transport.abort()
        self._live.clear()
        self._clients.clear()

    @property
    def live_ports(self) -> set[int]:
        """Local ports of the upstream connections open right now."""
        return set(self._live.values())

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        host = f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}" if userinfo else host))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        port = up_writer.get_extra_info("sockname")[1]
        self.upstream_ports.add(port)
        self._live[up_writer] = port
        self._clients.add(writer)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._live.pop(up_writer, None)
        self._clients.discard(writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


@contextlib.asynccontextmanager
async def proxy_to(target: str, *, opened: bool = True) -> AsyncIterator[TcpProxy]:
    """A proxy to `target` for the length of the block."""
    proxy = TcpProxy(target)
    if opened:
        await proxy.open()
    try:
        yield proxy
    finally:
        await proxy.cut()


@dataclass
class Reply:
    """One request as a client saw it."""

    code: int
    body: bytes
    started: float
    took: float

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


async def _fetch(url: str, method: str = "GET", body: Any = None, timeout: float = 30) -> Reply:
    """One request; a connection that fails (nothing listening yet) is a reply with code 0."""
    started = time.monotonic()
    try:
        reply = await tornado.httpclient.AsyncHTTPClient().fetch(
            url,
            method=method,
            body=None if body is None else json.dumps(body),
            headers={"Content-Type": "application/json"} if body is not None else {},
            raise_error=False,
            request_timeout=timeout,
        )
    except OSError:
        return Reply(0, b"", started, time.monotonic() - started)
    return Reply(reply.code, reply.body or b"", started, time.monotonic() - started)


async def _backends(settings: Any, proxy: TcpProxy) -> set[int]:
    """Client ports of the PostgreSQL sessions the app holds (through the proxy)."""
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        cur = await conn.execute(
            "SELECT client_port FROM pg_stat_activity WHERE client_port = ANY(%s)",
            [list(proxy.upstream_ports)],
        )
        return {row[0] for row in await cur.fetchall()}


@dataclass
class Sessions:
    """The app's PostgreSQL sessions as the server lists them, and its pool's own count."""

    ports: set[int]
    pooled: int

    @property
    def outside_pool(self) -> int:
        """Sessions the pool does not hold (the event listener's, a run lock's, a leak)."""
        return len(self.ports) - self.pooled


async def _sessions(settings: Any, proxy: TcpProxy, app: Any) -> Sessions:
    """The app's sessions once each is a connection the proxy carries (none orphaned) and
    only the event listener's is outside the pool; as found after 10 s otherwise."""
    deadline = time.monotonic() + 10
    while True:
        found = Sessions(
            await _backends(settings, proxy), app.services.db.pool.get_stats()["pool_size"]
        )
        settled = found.ports == proxy.live_ports and found.outside_pool == 1
        if settled or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


async def _until_serving(url: str, limit: float) -> float:
    """Seconds until GET /projects answers 200; fails past `limit`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        reply = await _fetch(url + "/projects", timeout=FAST * 2)
        if reply.code == 200:
            return time.monotonic() - started
        assert reply.code == 503, reply.body
        await asyncio.sleep(0.05)
    raise AssertionError(f"not serving again within {limit} s")


def _outage_requests(project_id: str) -> list[tuple[str, str, Any]]:
    return [
        ("GET", "/projects", None),
        ("POST", "/projects", {"name": "during", "price": 1}),
        ("GET", f"/projects/{project_id}", None),
        ("GET", "/tasks", None),
        ("GET", f"/tasks/{MISSING_UUID}", None),
        ("POST", "/tasks/batch_create", [task_item(project_id)]),
        ("POST", "/tasks/batch_update", [{"task_id": MISSING_UUID, "name": "x"}]),
    ]


async def _assert_fast_503s(url: str, project_id: str) -> None:
    for method, path, body in _outage_requests(project_id):
        reply = await _fetch(url + path, method, body)
        assert (reply.code, method, path) == (503, method, path), reply.body
        assert reply.took < FAST, (method, path, reply.took)
        assert reply.json()["code"] == "service_unavailable"
    health = await _fetch(url + "/health")
    assert health.code == 200
    assert health.took < FAST


def _gauge(exposition: bytes, name: str) -> float:
    for line in exposition.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_database_cut_while_idle(settings: Any, make_server: Any) -> None:
    async with proxy_to(settings.database_url) as proxy:
        app = await make_server(database_url=proxy.url(settings.database_url))
        project = await create_project(app)
        assert (await app.fetch("/tasks")).code == 200
        before = await _sessions(settings, proxy, app)
        assert before.outside_pool == 1, before

        await proxy.cut()
        await _assert_fast_503s(app.url, project["uuid"])
        assert _gauge((await app.fetch("/metrics")).body, "satchel_database_up") == 0
        await asyncio.sleep(1.0)
        await _assert_fast_503s(app.url, project["uuid"])

        await proxy.open()
        assert await _until_serving(app.url, RECOVERY) < RECOVERY
        for method, path, body in _outage_requests(project["uuid"])[:5]:
            reply = await _fetch(app.url + path, method, body)
            assert reply.code in (200, 201, 404), (method, path, reply.code, reply.body)
        assert _gauge((await app.fetch("/metrics")).body, "satchel_database_up") == 1
        # No session left behind by the cut, none the app does not account for: the same
        # one session outside the pool as before (the listener), the pool within its bounds.
        after = await _sessions(settings, proxy, app)
        assert after.ports == proxy.live_ports
        assert after.outside_pool == before.outside_pool, (before, after)
        assert after.pooled <= app.services.db.pool.max_size


@dataclass
class Load:
    """Clients hammering the app; every reply is kept."""

    url: str
    project_id: str
    replies: list[Reply]
    running: bool = True

    async def client(self, index: int) -> None:
        """One client: list, read, create and list tasks, as fast as answers come."""
        requests = [
            ("GET", "/projects?limit=10", None),
            ("GET", f"/projects/{self.project_id}", None),
            ("POST", "/projects", {"name": f"load {index}", "price": "1.00"}),
            ("GET", f"/tasks?project_id={self.project_id}", None),
        ]
        step = index
        while self.running:
            method, path, body = requests[step % len(requests)]
            step += 1
            reply = await _fetch(self.url + path, method, body, timeout=10)
            self.replies.append(reply)
            if reply.code == 503:
                await asyncio.sleep(0.02)  # a client backs off a little, as real ones do

    def between(self, start: float, end: float) -> list[Reply]:
        """Replies to requests sent in [start, end)."""
        return [r for r in self.replies if start <= r.started < end]


@pytest.mark.slow
async def test_database_cut_under_load(settings: Any, make_server: Any) -> None:
    async with proxy_to(settings.database_url) as proxy:
        app = await make_server(database_url=proxy.url(settings.database_url))
        project = await create_project(app)
        load = Load(app.url, project["uuid"], [])
        clients = [asyncio.ensure_future(load.client(i)) for i in range(8)]
        try:
            await asyncio.sleep(2.0)
            load.running = False
            await asyncio.gather(*clients)
            before = await _sessions(settings, proxy, app)
            load.running = True
            clients = [asyncio.ensure_future(load.client(i)) for i in range(8)]
            await asyncio.sleep(1.0)

            cut_at = time.monotonic()
            await proxy.cut()
            await asyncio.sleep(3.0)
            opened_at = time.monotonic()
            await proxy.open()
            await asyncio.sleep(RECOVERY + 2.0)
        finally:
            load.running = False
            await asyncio.gather(*clients)

        codes = {r.code for r in load.replies}
        assert codes <= {200, 201, 503}, codes
        # In flight at the cut or sent during the outage: every one answered fast.
        outage = [r for r in load.replies if r.started + r.took >= cut_at and r.started < opened_at]
        assert outage
        slow = [(r.code, round(r.took, 3)) for r in outage if r.took >= FAST]
        assert slow == []
        sent_during = load.between(cut_at + 0.1, opened_at)
        assert sent_during
        assert {r.code for r in sent_during} == {503}
        # Serving again within RECOVERY seconds, and fully: nothing fails after that.
        back = load.between(opened_at, opened_at + RECOVERY + 2.0)
        first_ok = min(r.started + r.took for r in back if r.code in (200, 201))
        assert first_ok - opened_at < RECOVERY
        late = load.between(opened_at + RECOVERY, opened_at + RECOVERY + 2.0)
        assert late
        assert {r.code for r in late} <= {200, 201}
        assert max(r.took for r in late) < FAST

        # No session left behind by the cut, none the app does not account for: the same
        # one session outside the pool as before (the listener), the pool within its bounds.
        after = await _sessions(settings, proxy, app)
        assert after.ports == proxy.live_ports
        assert after.outside_pool == before.outside_pool == 1, (before, after)
        assert after.pooled <= app.services.db.pool.max_size


def _serve_env(settings: Any, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HOST": "127.0.0.1",
        "DATABASE_URL": settings.database_url,
        "S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "JOB_CONCURRENCY": "1",
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "WARNING",
        "DRAIN_TIMEOUT": "2",
        **extra,
    }


@pytest.mark.slow
async def test_database_down_when_the_process_starts(settings: Any, tmp_path: Path) -> None:
    async with proxy_to(settings.database_url, opened=False) as proxy:
        port = _free_port()
        env = _serve_env(settings, DATABASE_URL=proxy.url(settings.database_url), PORT=str(port))
        url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / "satchel.log"
        started = time.monotonic()
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("satchel")),
                "serve",
                env=env,
                stdout=log,
                stderr=log,
            )
        try:
            while (await _fetch(url + "/health", timeout=1)).code != 200:
                assert proc.returncode is None, log_path.read_text()
                assert time.monotonic() - started < STARTUP, "not listening"
                await asyncio.sleep(0.1)
            # Listening, alive, and answering 503 fast, for as long as the database is away.
            for _ in range(3):
                await _assert_fast_503s(url, MISSING_UUID)
                await asyncio.sleep(0.5)
            ready = await _fetch(url + "/ready")
            assert ready.code == 503
            assert ready.json()["checks"]["database"] == "down"
            assert proc.returncode is None

            await proxy.open()
            assert await _until_serving(url, RECOVERY) < RECOVERY
            created = await _fetch(url + "/projects", "POST", {"name": "late", "price": 1})
            assert created.code == 201, created.body
            assert (await _fetch(url + "/ready")).code == 200
            assert proc.returncode is None, "the process restarted"
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 0, log_path.read_text()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    """A loopback origin for archive sources."""
    found, server = await start_origin()
    yield found
    await stop_origin(server)


async def _task(app: Any, task_id: str) -> Any:
    return (await app.fetch(f"/tasks/{task_id}")).json()


async def _open_uploads(objects: Any) -> list[Any]:
    listing = await objects.client.list_multipart_uploads(Bucket=objects.bucket)
    return listing.get("Uploads", [])  # type: ignore[no-any-return]


@pytest.mark.slow
async def test_s3_cut_in_the_middle_of_an_archive(
    settings: Any, make_server: Any, origin: Origin, app: Any
) -> None:
    # 24 MiB trickling in 64 KiB chunks: three 8 MiB parts, the first while the rest downloads.
    origin.files["big.bin"] = FileSpec(os.urandom(24 * MIB), delay_per_chunk=0.01)
    async with proxy_to(settings.s3_endpoint_url) as s3:
        runner = await make_server(
            s3_endpoint_url=s3.url(settings.s3_endpoint_url),
            job_concurrency=1,
            fetch_allowlist=allow(origin),
        )
        project = await create_project(runner)
        created = await runner.fetch(
            "/tasks/batch_create",
            "POST",
            [task_item(project["uuid"], urls=[f"{origin.url}/big.bin"])],
        )
        assert created.code == 201, created.body
        task_id = created.json()["items"][0]["uuid"]

        # Cut S3 once the first part is on its way (a third of the bytes are in).
        deadline = time.monotonic() + 30
        while (task := await _task(runner, task_id))["progress"] < 40:
            assert task["status"] in ("initialized", "processing"), task
            assert time.monotonic() < deadline, task
            await asyncio.sleep(0.05)
        await s3.cut()

        # With S3 gone for good the run cannot finish: it fails, with a reason, and REST
        # keeps answering meanwhile.
        deadline = time.monotonic() + S3_GIVE_UP
        while (task := await _task(runner, task_id))["status"] != "failed":
            assert task["status"] == "processing", task
            assert time.monotonic() < deadline, task
            await asyncio.sleep(0.2)
        assert task["error"].startswith("storing the archive failed"), task
        assert task["archive_url"] is None
        metrics = (await runner.fetch("/metrics")).body.decode()
        assert 'satchel_archive_failures_total{reason="storage"} 1.0' in metrics

        # Nothing orphaned once S3 is back: no incomplete multipart upload of this task.
        await s3.open()
        deadline = time.monotonic() + 10
        while leftovers := [
            u for u in await _open_uploads(app.services.objects) if task_id in u["Key"]
        ]:
            assert time.monotonic() < deadline, leftovers
            await asyncio.sleep(0.5)
