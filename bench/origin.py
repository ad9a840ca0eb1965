"""A loopback file origin for `bench.archive`: generated files, none of them held in memory.

`python -m bench.origin` listens on HOST:PORT (127.0.0.1:8002 by default). The path says what to
serve, so the origin keeps no state and every run gets the same bytes:

    GET /random/SEED/SIZE/NAME   SIZE bytes of incompressible data (ZIP stores it)
    GET /text/SEED/SIZE/NAME     SIZE bytes of log-like ASCII text (ZIP deflates it)
    GET /health                  200 "ok"

`?rate=N` after either file path paces the body at N bytes per second, as a remote origin
behind a network of that speed would send it.

Two pools are generated once from fixed seeds at start-up (16 MiB of random bytes, 4 MiB of
text); a file is a run of slices of its pool at offsets drawn from `random.Random(SEED)`, so
files differ from each other, are the same on every request, and cost the origin no generation
work per byte. The content type follows NAME's extension, as a real origin would send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import Iterator

POOL_BYTES = 16 * 1024 * 1024
TEXT_POOL_BYTES = 4 * 1024 * 1024
CHUNK = 256 * 1024
POOL_SEED = 20261203
TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "zip": "application/zip",
    "mp4": "video/mp4",
    "pdf": "application/pdf",
    "txt": "text/plain; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
    "log": "text/plain; charset=utf-8",
    "json": "application/json",
}
_WORDS = (
    "archive",
    "bucket",
    "upload",
    "part",
    "stream",
    "zipper",
    "fetch",
    "origin",
    "task",
    "project",
    "status",
    "progress",
    "finished",
    "processing",
    "queued",
    "retry",
    "timeout",
    "header",
    "chunk",
    "entry",
    "deflate",
    "stored",
    "central",
    "directory",
    "descriptor",
    "checksum",
    "request",
    "response",
    "client",
    "server",
    "worker",
    "thread",
    "loop",
    "lock",
    "epoch",
    "fence",
    "runner",
    "backlog",
    "invoice",
    "logo",
    "brochure",
    "banner",
    "photo",
    "render",
    "draft",
    "final",
    "review",
    "approved",
    "client-side",
    "customer",
    "campaign",
    "spring",
    "summer",
    "autumn",
    "winter",
    "north",
    "south",
    "east",
    "west",
)
_LEVELS = ("DEBUG", "INFO", "INFO", "INFO", "WARNING", "ERROR")


def random_pool(size: int = POOL_BYTES) -> bytes:
    """Incompressible bytes from a fixed seed."""
    return random.Random(POOL_SEED).randbytes(size)


def text_pool(size: int = POOL_BYTES) -> bytes:
    """Log-like lines from a fixed seed: deflate level 1 shrinks them about 3 to 4 times."""
    rng = random.Random(POOL_SEED + 1)
    lines: list[str] = []
    length = 0
    second = 0
    while length < size:
        second += rng.randrange(3)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(3, 9)))
        line = (
            f"2026-12-03T{second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d}."
            f"{rng.randrange(1000):03d}Z {rng.choice(_LEVELS):<7} satchel.{rng.choice(_WORDS)}"
            f" task={rng.getrandbits(64):016x} bytes={rng.randrange(1 << 24)}"
            f" path=/{rng.choice(_WORDS)}/{rng.randrange(10_000)}/{rng.choice(_WORDS)}.png"
            f" {words}\n"
        )
        lines.append(line)
        length += len(line)
    return "".join(lines).encode()[:size]


def slices(pool: memoryview, seed: int, size: int) -> Iterator[memoryview]:
    """The file SEED of SIZE bytes: slices of pool at offsets drawn from random.Random(seed)."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(CHUNK, left)
        start = rng.randrange(len(pool) - n + 1)
        yield pool[start : start + n]
        left -= n


class Origin:
    """The HTTP/1.1 side: GET and HEAD, keep-alive, Content-Length, no ranges."""

    def __init__(self) -> None:
        self.pools = {
            "random": memoryview(random_pool()),
            "text": memoryview(text_pool(TEXT_POOL_BYTES)),
        }
        self.requests = 0
        self.bytes_sent = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one connection until the client closes it or asks to."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target = [*lines[0].split(" "), "", ""][:2]
                close = any(
                    line.lower().startswith("connection:") and "close" in line.lower()
                    for line in lines[1:]
                )
                path, _, query = target.partition("?")
                await self._answer(writer, method, path, _rate(query))
                self.requests += 1
                if close:
                    return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(
        self, writer: asyncio.StreamWriter, method: str, path: str, rate: float | None
    ) -> None:
        parts = path.strip("/").split("/")
        if method not in ("GET", "HEAD"):
            return await self._simple(writer, 405, b"method not allowed\n")
        if parts == ["health"]:
            return await self._simple(writer, 200, b"ok\n")
        if len(parts) != 4 or parts[0] not in self.pools:
            return await self._simple(writer, 404, b"not found\n")
        try:
            seed, size = int(parts[1]), int(parts[2])
        except ValueError:
            return await self._simple(writer, 404, b"not found\n")
        extension = parts[3].rpartition(".")[2].lower()
        content_type = TYPES.get(extension, "application/octet-stream")
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {size}\r\n"
            "Cache-Control: no-store\r\n\r\n"
        )
        writer.write(head.encode())
        if method == "GET":
            loop = asyncio.get_running_loop()
            started, sent = loop.time(), 0
            for piece in slices(self.pools[parts[0]], seed, size):
                writer.write(piece)
                sent += len(piece)
                self.bytes_sent += len(piece)
                await writer.drain()
                if rate:
                    await asyncio.sleep(max(0.0, started + sent / rate - loop.time()))
        await writer.drain()

    async def _simple(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()


def _rate(query: str) -> float | None:
    """The `rate` query parameter in bytes per second, if any."""
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == "rate":
            with contextlib.suppress(ValueError):
                rate = float(value)
                return rate if rate > 0 else None
    return None


async def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    origin = Origin()
    host = os.environ.get("HOST", "127.0.0.1")
    server = await asyncio.start_server(
        origin.handle, host, int(os.environ.get("PORT", "8002")), limit=64 * 1024
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    async with server:
        await stopping.wait()
    print(f"origin: {origin.requests} requests, {origin.bytes_sent} body bytes sent", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
