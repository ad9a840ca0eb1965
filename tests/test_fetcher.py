"""The hardened fetcher against a misbehaving loopback origin that counts what it receives."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ipaddress
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from tornado.iostream import IOStream

from tasks import fetcher as fetcher_module
from tasks.fetcher import PIPE_BYTES, READ_CHUNK, Download, Fetcher, FetchError, FetchPolicy

MiB = 1 << 20


@dataclass
class Request:
    """What the origin received."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Conn:
    """One connection to the origin, with helpers to answer (or not)."""

    request: Request
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def head(self, status: str, headers: dict[str, Any] | None = None) -> None:
        """Send the status line and headers."""
        lines = [f"HTTP/1.1 {status}", "Connection: close"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.writer.write(data)
        await self.writer.drain()

    async def hang(self) -> None:
        """Send nothing more; return once the client goes away."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass


Handler = Callable[[Conn], Awaitable[None]]


@dataclass
class Origin:
    """A raw HTTP/1.1 server on 127.0.0.1: routes by path, records every request."""

    routes: dict[str, Handler] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        """An absolute URL on this origin."""
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str | None = None) -> int:
        """Requests received (for `path`)."""
        return sum(1 for r in self.requests if path is None or r.path == path)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one request, record it, run its handler, close."""
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
            line, *fields = raw.decode("latin-1").split("\r\n")
            method, path, _ = line.split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
            request = Request(method, path, headers)
            self.requests.append(request)
            handler = self.routes.get(path, not_found)
            await handler(Conn(request, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def not_found(conn: Conn) -> None:
    """404 with a small body."""
    await conn.head("404 Not Found", {"Content-Length": 9})
    await conn.send(b"not found")


def file(
    body: bytes,
    *,
    chunked: bool = False,
    length: bool = True,
    headers: dict[str, Any] | None = None,
) -> Handler:
    """Serve `body` with Content-Length, chunked, or until close."""

    async def handler(conn: Conn) -> None:
        extra = {"Content-Type": "application/octet-stream", **(headers or {})}
        if chunked:
            await conn.head("200 OK", {"Transfer-Encoding": "chunked", **extra})
            for start in range(0, len(body), 50_000):  # uneven against Tornado's 64 KiB reads
                piece = body[start : start + 50_000]
                await conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            await conn.send(b"0\r\n\r\n")
            return
        await conn.head("200 OK", {"Content-Length": len(body), **extra} if length else extra)
        await conn.send(body)

    return handler


def status(line: str, headers: dict[str, Any] | None = None) -> Handler:
    """An empty response with this status."""

    async def handler(conn: Conn) -> None:
        await conn.head(line, {"Content-Length": 0, **(headers or {})})

    return handler


def redirect(location: str, code: str = "302 Found") -> Handler:
    """A redirect to `location`."""
    return status(code, {"Location": location})


def sequence(*handlers: Handler) -> Handler:
    """The n-th request gets the n-th handler; the last one repeats."""
    queue = list(handlers)

    async def handler(conn: Conn) -> None:
        await (queue.pop(0) if len(queue) > 1 else queue[0])(conn)

    return handler


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    """A fresh origin on a random loopback port."""
    found = Origin()
    server = await asyncio.start_server(found.serve, "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    yield found
    server.close()
    await server.wait_closed()


@pytest.fixture
async def other_origin() -> AsyncIterator[Origin]:
    """A second origin, not allowlisted."""
    found = Origin()
    server = await asyncio.start_server(found.serve, "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    found.routes["/file.bin"] = file(b"secret")
    yield found
    server.close()
    await server.wait_closed()


@pytest.fixture(autouse=True)
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address the client connects to; a tripwire makes any non-loopback connect fail."""
    seen: list[tuple[str, int]] = []
    real = IOStream.connect

    def guarded(self: IOStream, address: Any, server_hostname: str | None = None) -> Any:
        seen.append((address[0], address[1]))
        if not ipaddress.ip_address(address[0].partition("%")[0]).is_loopback:
            raise AssertionError(f"test traffic to non-loopback {address}")
        return real(self, address, server_hostname)

    monkeypatch.setattr(IOStream, "connect", guarded)
    return seen


FetcherFactory = Callable[..., Fetcher]


@pytest.fixture
async def make_fetcher(origin: Origin) -> AsyncIterator[FetcherFactory]:
    """Fetchers that allow the origin (by host:port) with short, test-sized timings."""
    made: list[Fetcher] = []

    def make(**overrides: Any) -> Fetcher:
        settings: dict[str, Any] = {
            "allowlist": (f"127.0.0.1:{origin.port}",),
            "connect_timeout": 2.0,
            "stall_timeout": 2.0,
            "total_timeout": 20.0,
            "backoff": 0.01,
        }
        made.append(Fetcher(FetchPolicy(**{**settings, **overrides})))
        return made[-1]

    yield make
    for fetcher in made:
        await fetcher.close()


async def fetch(fetcher: Fetcher, url: str) -> tuple[Download, bytes]:
    """Download `url` whole."""
    async with fetcher.open(url) as download:
        body = bytearray()
        async for chunk in download:
            body += chunk
    return download, bytes(body)


async def fetch_error(fetcher: Fetcher, url: str) -> tuple[FetchError, bytes]:
    """The error a download of `url` ends with, and the bytes the consumer got before it."""
    body = bytearray()

    async def consume() -> None:
        async with fetcher.open(url) as download:
            async for chunk in download:
                body.extend(chunk)

    with pytest.raises(FetchError) as caught:
        await consume()
    return caught.value, bytes(body)


# --- the happy paths -------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked", "until-close"])
async def test_download_is_byte_for_byte(
    origin: Origin, make_fetcher: FetcherFactory, framing: str
) -> None:
    body = os.urandom(3 * MiB + 12345)
    origin.routes["/data/blob.bin"] = file(
        body, chunked=framing == "chunked", length=framing == "length"
    )
    download, got = await fetch(make_fetcher(), origin.url("/data/blob.bin"))
    assert got == body
    assert download.name == "blob.bin"
    assert download.size == (len(body) if framing == "length" else None)
    assert download.content_type == "application/octet-stream"
    assert origin.count() == 1
    assert origin.requests[0].headers["accept-encoding"] == "identity"


async def test_one_fetcher_serves_downloads_at_once(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    bodies = {f"/f{n}.bin": os.urandom(300_000 + n) for n in range(8)}
    for path, body in bodies.items():
        origin.routes[path] = file(body, chunked=True)
    fetcher = make_fetcher()
    results = await asyncio.gather(*(fetch(fetcher, origin.url(path)) for path in bodies))
    assert [got for _, got in results] == list(bodies.values())
    assert origin.count() == 8


async def test_compressed_body_is_not_decompressed(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    packed = gzip.compress(b"a" * 100_000)
    origin.routes["/a.txt"] = file(packed, headers={"Content-Encoding": "gzip"})
    _, got = await fetch(make_fetcher(), origin.url("/a.txt"))
    assert got == packed


@pytest.mark.parametrize(
    ("disposition", "path", "name"),
    [
        ('attachment; filename="report 2026.pdf"', "/get", "report 2026.pdf"),
        ("attachment; filename*=UTF-8''%E2%82%AC%20rates.txt", "/get", "€ rates.txt"),
        (
            "attachment; filename=\"plain.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt",
            "/get",
            "résumé.txt",
        ),
        ("inline", "/files/r%C3%A9sum%C3%A9%20final.pdf", "résumé final.pdf"),
        (None, "/files/..%2F..%2Fetc%2Fpasswd", "../../etc/passwd"),  # the zipper sanitises
    ],
)
async def test_entry_name(
    origin: Origin, make_fetcher: FetcherFactory, disposition: str | None, path: str, name: str
) -> None:
    headers = {"Content-Disposition": disposition} if disposition else {}
    origin.routes[path] = file(b"x", headers={"Content-Type": "application/pdf", **headers})
    download, _ = await fetch(make_fetcher(), origin.url(path))
    assert download.name == name
    assert download.content_type == "application/pdf"


async def test_html_page_for_a_file_url_fails(origin: Origin, make_fetcher: FetcherFactory) -> None:
    page = {"Content-Type": "text/html; charset=utf-8"}
    origin.routes["/logo.png"] = file(b"<html>login</html>", headers=page)
    origin.routes["/docs/index.html"] = file(b"<html>ok</html>", headers=page)
    error, got = await fetch_error(make_fetcher(), origin.url("/logo.png"))
    assert error.reason == "answered with an HTML page, not a file"
    assert str(error) == f"{origin.url('/logo.png')}: answered with an HTML page, not a file"
    assert got == b""
    download, got = await fetch(make_fetcher(), origin.url("/docs/index.html"))
    assert got == b"<html>ok</html>"
    assert download.content_type == "text/html"


# --- status codes and retries ----------------------------------------------------------------


async def test_404_fails_at_once(origin: Origin, make_fetcher: FetcherFactory) -> None:
    error, _ = await fetch_error(make_fetcher(), origin.url("/missing.bin"))
    assert error.reason == "answered 404 Not Found"
    assert origin.count() == 1


async def test_503_twice_then_200_succeeds(origin: Origin, make_fetcher: FetcherFactory) -> None:
    unavailable = status("503 Service Unavailable")
    origin.routes["/f.bin"] = sequence(unavailable, unavailable, file(b"payload"))
    _, got = await fetch(make_fetcher(), origin.url("/f.bin"))
    assert got == b"payload"
    assert origin.count() == 3


async def test_503_three_times_fails(origin: Origin, make_fetcher: FetcherFactory) -> None:
    origin.routes["/f.bin"] = status("503 Service Unavailable")
    error, _ = await fetch_error(make_fetcher(), origin.url("/f.bin"))
    assert error.reason == "answered 503 Service Unavailable"
    assert origin.count() == 3


async def test_429_honours_a_capped_retry_after(
    origin: Origin, make_fetcher: FetcherFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetcher_module, "RETRY_AFTER_CAP", 0.3)
    origin.routes["/f.bin"] = sequence(
        status("429 Too Many Requests", {"Retry-After": 3600}), file(b"ok")
    )
    started = time.monotonic()
    _, got = await fetch(make_fetcher(), origin.url("/f.bin"))
    assert got == b"ok"
    assert 0.3 <= time.monotonic() - started < 2
    assert origin.count() == 2


async def test_connection_refused_is_retried_then_fails(
    make_fetcher: FetcherFactory, connects: list[tuple[str, int]]
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    fetcher = make_fetcher(allowlist=(f"127.0.0.1:{port}",))
    error, _ = await fetch_error(fetcher, f"http://127.0.0.1:{port}/f.bin")
    assert error.reason.startswith("connection failed")
    assert len(connects) == 3


async def test_connect_timeout_is_retried_then_fails(
    make_fetcher: FetcherFactory, connects: list[tuple[str, int]]
) -> None:
    with contextlib.ExitStack() as stack:
        # A listener whose accept queue is full drops further SYNs: connecting hangs.
        full = stack.enter_context(socket.socket())
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        for _ in range(4):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        await asyncio.sleep(0.05)
        fetcher = make_fetcher(allowlist=(f"127.0.0.1:{port}",), connect_timeout=0.2)
        started = time.monotonic()
        error, _ = await fetch_error(fetcher, f"http://127.0.0.1:{port}/f.bin")
    assert error.reason == "timed out connecting"
    assert 0.6 <= time.monotonic() - started < 2
    assert [p for _, p in connects] == [port] * 3


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/f.bin", "file:///etc/passwd", "http:///f.bin"])
async def test_only_http_urls(make_fetcher: FetcherFactory, url: str) -> None:
    error, _ = await fetch_error(make_fetcher(), url)
    assert error.reason.startswith("not an http(s) URL")


# --- timeouts --------------------------------------------------------------------------------


async def test_stall_mid_body_fails_within_stall_timeout(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    async def stall(conn: Conn) -> None:
        await conn.head("200 OK", {"Content-Length": 1000})
        await conn.send(b"x" * 100)
        await conn.hang()

    origin.routes["/f.bin"] = stall
    started = time.monotonic()
    error, got = await fetch_error(make_fetcher(stall_timeout=0.5), origin.url("/f.bin"))
    assert 0.5 <= time.monotonic() - started < 1.5
    assert got == b"x" * 100
    assert error.reason == (
        "stalled: no data for 0.5 s after 100 of 1000 bytes; the origin does not support resuming"
    )
    assert origin.count() == 1


async def test_stall_before_headers_is_retried(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    async def silent(conn: Conn) -> None:
        await conn.hang()

    origin.routes["/f.bin"] = silent
    error, _ = await fetch_error(make_fetcher(stall_timeout=0.2), origin.url("/f.bin"))
    assert error.reason == "stalled: no data for 0.2 s"
    assert origin.count() == 3


async def test_total_timeout(origin: Origin, make_fetcher: FetcherFactory) -> None:
    async def trickle(conn: Conn) -> None:
        await conn.head("200 OK", {"Content-Length": 1000})
        for _ in range(1000):
            await conn.send(b"x")
            await asyncio.sleep(0.05)

    origin.routes["/f.bin"] = trickle
    started = time.monotonic()
    error, got = await fetch_error(
        make_fetcher(stall_timeout=0.5, total_timeout=0.6), origin.url("/f.bin")
    )
    assert error.reason == "timed out after 0.6 s"
    assert 0.6 <= time.monotonic() - started < 1.5
    assert 0 < len(got) < 1000


# --- lying lengths and sizes -----------------------------------------------------------------


async def test_body_shorter_than_content_length_fails(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    async def short(conn: Conn) -> None:
        await conn.head("200 OK", {"Content-Length": 2000})
        await conn.send(b"x" * 1000)

    origin.routes["/f.bin"] = short
    error, got = await fetch_error(make_fetcher(), origin.url("/f.bin"))
    assert error.reason == (
        "connection closed after 1000 of 2000 bytes; the origin does not support resuming"
    )
    assert got == b"x" * 1000
    assert origin.count() == 1


async def test_body_longer_than_content_length_is_cut_at_the_length(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    # HTTP frames the message by Content-Length; what follows is not part of this response.
    async def long(conn: Conn) -> None:
        await conn.head("200 OK", {"Content-Length": 1000})
        await conn.send(b"x" * 1000 + b"y" * 1000)

    origin.routes["/f.bin"] = long
    download, got = await fetch(make_fetcher(), origin.url("/f.bin"))
    assert got == b"x" * 1000
    assert download.size == 1000


async def test_over_size_with_honest_length_fails_before_the_body(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    origin.routes["/big.bin"] = file(b"x" * 5000)
    fetcher = make_fetcher(max_file_bytes=4096)
    with pytest.raises(FetchError) as caught:
        async with fetcher.open(origin.url("/big.bin")):
            pytest.fail("entered despite an over-size Content-Length")
    assert caught.value.reason == "larger than the limit (5000 > 4096 bytes)"


@pytest.mark.parametrize("chunked", [True, False])
async def test_over_size_without_length_is_counted(
    origin: Origin, make_fetcher: FetcherFactory, chunked: bool
) -> None:
    origin.routes["/big.bin"] = file(b"x" * 300_000, chunked=chunked, length=False)
    error, got = await fetch_error(make_fetcher(max_file_bytes=200_000), origin.url("/big.bin"))
    assert error.reason == "larger than the limit of 200000 bytes"
    assert len(got) <= 200_000


async def test_lying_small_length_cannot_beat_the_limit(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    origin.routes["/big.bin"] = file(b"x" * 300_000, chunked=True, headers={"X-Size": 10})
    error, _ = await fetch_error(make_fetcher(max_file_bytes=100_000), origin.url("/big.bin"))
    assert error.reason == "larger than the limit of 100000 bytes"


# --- redirects and the address guard ---------------------------------------------------------


async def test_redirect_to_an_allowed_file(origin: Origin, make_fetcher: FetcherFactory) -> None:
    origin.routes["/old/a.bin"] = redirect("/new/b.bin", "301 Moved Permanently")
    origin.routes["/new/b.bin"] = file(b"moved")
    download, got = await fetch(make_fetcher(), origin.url("/old/a.bin"))
    assert got == b"moved"
    assert download.url == origin.url("/old/a.bin")
    assert download.name == "a.bin"  # named after the task's URL
    assert [r.path for r in origin.requests] == ["/old/a.bin", "/new/b.bin"]


@pytest.mark.parametrize(("hops", "ok"), [(5, True), (6, False)])
async def test_redirect_chain_limit(
    origin: Origin, make_fetcher: FetcherFactory, hops: int, ok: bool
) -> None:
    for hop in range(hops):
        origin.routes[f"/r{hop}"] = redirect(f"/r{hop + 1}", "307 Temporary Redirect")
    origin.routes[f"/r{hops}"] = file(b"end")
    if ok:
        _, got = await fetch(make_fetcher(), origin.url("/r0"))
        assert got == b"end"
        assert origin.count() == hops + 1
    else:
        error, _ = await fetch_error(make_fetcher(), origin.url("/r0"))
        assert error.reason == "too many redirects (more than 5)"
        assert origin.count() == 6
        assert origin.count(f"/r{hops}") == 0


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/file.bin", "http://localhost:{port}/"])
async def test_redirect_to_a_blocked_address_fails(
    origin: Origin,
    other_origin: Origin,
    make_fetcher: FetcherFactory,
    connects: list[tuple[str, int]],
    target: str,
) -> None:
    origin.routes["/a.bin"] = redirect(target.format(port=other_origin.port))
    error, _ = await fetch_error(make_fetcher(), origin.url("/a.bin"))
    assert error.reason == "refused: resolves to an internal address (127.0.0.1)"
    assert origin.count() == 1
    assert other_origin.count() == 0
    assert {port for _, port in connects} == {origin.port}


async def test_redirect_to_another_scheme_fails(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    origin.routes["/a.bin"] = redirect("file:///etc/passwd")
    error, _ = await fetch_error(make_fetcher(), origin.url("/a.bin"))
    assert error.reason == "not an http(s) URL (file:///etc/passwd)"


INTERNAL_SPELLINGS = [
    "localhost",
    "LocalHost",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::127.0.0.1]",
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "0177.0.0.1",
    "017700000001",
    "127.1",
    "127.0.1",
    "127.0.0.2",
    "127.255.255.254",
    "0.0.0.0",
    "0",
    "[::]",
    "169.254.169.254",
    "[::ffff:169.254.169.254]",
    "[64:ff9b::a9fe:a9fe]",
    "[64:ff9b::7f00:1]",
    "[64:ff9b:1::a9fe:a9fe]",
    "[2002:7f00:1::]",
    "[2002:a9fe:a9fe::1]",
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
    "10.0.0.1",
    "192.168.1.1",
    "172.16.0.1",
    "100.64.0.1",
    "[fc00::1]",
    "[fd12:3456::1]",
    "[fe80::1]",
    "[fec0::1]",
    "224.0.0.1",
    "[ff02::1]",
    "198.18.0.1",
    "192.0.2.1",
    "198.51.100.7",
    "203.0.113.9",
    "192.0.0.8",
    "240.0.0.1",
    "255.255.255.255",
    "[2001:db8::1]",
    "[100::1]",
]


@pytest.mark.parametrize("host", INTERNAL_SPELLINGS)
async def test_internal_addresses_are_refused_before_connecting(
    origin: Origin, make_fetcher: FetcherFactory, connects: list[tuple[str, int]], host: str
) -> None:
    origin.routes["/file.bin"] = file(b"secret")
    url = f"http://{host}:{origin.port}/file.bin"
    error, got = await fetch_error(make_fetcher(), url)
    assert error.reason.startswith("refused: resolves to an internal address (")
    assert error.url == url
    assert got == b""
    assert connects == []
    assert origin.count() == 0


async def test_allowlisted_host_is_compared_as_written(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    origin.routes["/file.bin"] = file(b"ok")
    fetcher = make_fetcher(allowlist=("127.0.0.1",))
    _, got = await fetch(fetcher, origin.url("/file.bin"))
    assert got == b"ok"
    for host in ["127.1", "2130706433", "[::ffff:127.0.0.1]", "localhost"]:
        error, _ = await fetch_error(fetcher, f"http://{host}:{origin.port}/file.bin")
        assert error.reason.startswith("refused")
    assert origin.count() == 1


async def test_allowlisted_host_port_opens_that_port_only(
    origin: Origin, other_origin: Origin, make_fetcher: FetcherFactory
) -> None:
    error, _ = await fetch_error(make_fetcher(), other_origin.url("/file.bin"))
    assert error.reason == "refused: resolves to an internal address (127.0.0.1)"
    assert other_origin.count() == 0


async def test_allowlisted_network(origin: Origin, make_fetcher: FetcherFactory) -> None:
    origin.routes["/file.bin"] = file(b"ok")
    fetcher = make_fetcher(allowlist=("127.0.0.0/8",))
    _, got = await fetch(fetcher, f"http://localhost:{origin.port}/file.bin")
    assert got == b"ok"
    error, _ = await fetch_error(fetcher, f"http://[::1]:{origin.port}/file.bin")
    assert error.reason == "refused: resolves to an internal address (::1)"


def test_malformed_allowlist_fails_at_start() -> None:
    with pytest.raises(ValueError, match="bad port"):
        Fetcher(FetchPolicy(allowlist=("example.com:http",)))


# --- resuming --------------------------------------------------------------------------------


def ranged(body: bytes, *, cut_at: int, etag: str = '"v1"') -> Handler:
    """A range-capable origin whose first response breaks off after `cut_at` bytes."""
    served = 0

    async def handler(conn: Conn) -> None:
        nonlocal served
        served += 1
        common = {"Accept-Ranges": "bytes", "ETag": etag}
        wanted = conn.request.headers.get("range", "")
        if served == 1 or not wanted or conn.request.headers.get("if-range") != etag:
            await conn.head("200 OK", {"Content-Length": len(body), **common})
            await conn.send(body[:cut_at] if served == 1 else body)
            return
        start = int(wanted.removeprefix("bytes=").rstrip("-"))
        span = f"bytes {start}-{len(body) - 1}/{len(body)}"
        await conn.head(
            "206 Partial Content",
            {"Content-Length": len(body) - start, "Content-Range": span, **common},
        )
        await conn.send(body[start:])

    return handler


async def test_mid_body_failure_resumes_with_range(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    body = os.urandom(2 * MiB)
    origin.routes["/f.bin"] = ranged(body, cut_at=700_000)
    download, got = await fetch(make_fetcher(), origin.url("/f.bin"))
    assert got == body
    assert download.size == len(body)
    assert origin.count() == 2
    resumed = origin.requests[1].headers
    assert resumed["range"] == f"bytes={700_000}-"
    assert resumed["if-range"] == '"v1"'


async def test_resume_answered_with_the_whole_file_fails(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    body = os.urandom(200_000)
    first = ranged(body, cut_at=70_000)
    changed = file(b"new content", headers={"Accept-Ranges": "bytes", "ETag": '"v2"'})
    origin.routes["/f.bin"] = sequence(first, changed)
    error, got = await fetch_error(make_fetcher(), origin.url("/f.bin"))
    assert error.reason == "the origin did not resume (answered 200 OK)"
    assert got == body[:70_000]
    assert origin.count() == 2


async def test_failure_before_the_first_byte_fetches_afresh(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    async def headers_only(conn: Conn) -> None:
        await conn.head("200 OK", {"Content-Length": 7})

    origin.routes["/f.bin"] = sequence(headers_only, file(b"payload"))
    _, got = await fetch(make_fetcher(), origin.url("/f.bin"))
    assert got == b"payload"
    assert origin.count() == 2
    assert "range" not in origin.requests[1].headers


async def test_mid_body_failure_without_range_support_fails(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    async def broken(conn: Conn) -> None:
        await conn.head("200 OK", {"Transfer-Encoding": "chunked"})
        for _ in range(6):
            await conn.send(b"%x\r\n%s\r\n" % (400_000, b"x" * 400_000))

    origin.routes["/f.bin"] = broken
    error, got = await fetch_error(make_fetcher(), origin.url("/f.bin"))
    # Tornado coalesces chunks (one socket read takes up to READ_CHUNK), and drops what it held
    # back when the connection breaks.
    assert 0 < len(got) <= 2_400_000
    assert error.reason == (
        f"connection lost after {len(got)} bytes; the origin does not support resuming"
    )
    assert origin.count() == 1


# --- backpressure, early exit, cancellation --------------------------------------------------


async def endless(conn: Conn) -> None:
    """512 MiB at loopback speed, for as long as the client listens."""
    await conn.head("200 OK", {"Content-Length": 1 << 29})
    for _ in range(1 << 13):
        if conn.writer.is_closing():
            return
        await conn.send(b"e" * 65536)


async def test_slow_consumer_keeps_buffering_bounded(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    size = 24 * MiB
    sent = 0

    async def firehose(conn: Conn) -> None:
        nonlocal sent
        await conn.head("200 OK", {"Content-Length": size})
        piece = b"z" * 65536
        for _ in range(size // len(piece)):
            await conn.send(piece)
            sent += len(piece)

    origin.routes["/big.bin"] = firehose
    fetcher = make_fetcher(stall_timeout=0.3)
    peak_buffered = peak_ahead = received = chunks = 0
    started = time.monotonic()
    async with fetcher.open(origin.url("/big.bin")) as download:
        async for chunk in download:
            received += len(chunk)
            chunks += 1
            if chunks == 1:
                await asyncio.sleep(0.6)  # longer than stall_timeout: a slow consumer, no stall
            elif chunks % 8 == 0:
                await asyncio.sleep(0.002)
            peak_buffered = max(peak_buffered, download.buffered)
            peak_ahead = max(peak_ahead, sent - received)
    assert received == size
    assert time.monotonic() - started > 0.6
    assert PIPE_BYTES // 2 < peak_buffered <= PIPE_BYTES + READ_CHUNK
    assert peak_ahead < 16 * MiB  # the rest sits in kernel socket buffers, not in the process


async def test_leaving_early_closes_the_socket(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    origin.routes["/f.bin"] = endless
    async with make_fetcher().open(origin.url("/f.bin")) as download:
        async for _chunk in download:
            break
    await asyncio.wait_for(origin.closed.wait(), 2)


async def test_cancelled_fetch_closes_its_socket(
    origin: Origin, make_fetcher: FetcherFactory
) -> None:
    origin.routes["/f.bin"] = endless
    first = asyncio.Event()

    async def consume() -> None:
        async with make_fetcher().open(origin.url("/f.bin")) as download:
            async for _chunk in download:
                first.set()
                await asyncio.sleep(3600)

    job = asyncio.create_task(consume())
    await first.wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    await asyncio.wait_for(origin.closed.wait(), 2)
