"""Hardened downloads of task files: streamed, bounded, retried, resumed, and kept off internal
addresses."""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import email.utils
import re
import socket
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpclient import HTTPRequest, HTTPResponse, _RequestProxy
from tornado.httputil import HTTPHeaders, HTTPInputError, RequestStartLine, ResponseStartLine
from tornado.iostream import IOStream, StreamClosedError
from tornado.simple_httpclient import (
    HTTPStreamClosedError,
    HTTPTimeoutError,
    SimpleAsyncHTTPClient,
    _HTTPConnection,
)

from tasks.netguard import AddressPolicy, AddressRefused, GuardedResolver

# Received but not yet taken by the consumer: enough to ride out a consumer's short pauses,
# small enough that every running download together stays a few MiB. Tornado reads 64 KiB.
PIPE_BYTES = 1 << 20
# Tornado's own body limit is effectively off: bytes are counted against the policy here, where
# a lying Content-Length cannot fool the count and the error names the limit.
_TORNADO_MAX_BODY = 1 << 62
# A piece of a body: the bytes as received, a read-only view of a buffer no one writes to again.
Chunk = bytes | memoryview
# Body bytes per socket read and per chunk handed on (Tornado's default is 64 KiB). Each chunk
# costs the same Python work on its way to the upload, whatever its size; 1 MiB used less CPU per
# byte in bench/archive than 512 KiB, and 2 MiB no less than 1 MiB.
READ_CHUNK = 1024 * 1024
# Caps what one connection's IOStream may buffer; it only ever reads READ_CHUNK past a pending
# read.
_STREAM_BUFFER = 4 * READ_CHUNK
# Concurrency is the job runner's business; Tornado's queue would only eat into the timeouts.
_MAX_CLIENTS = 1000
# An origin may ask for a pause before a retry, but not hold a job slot for minutes.
RETRY_AFTER_CAP = 30.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Characters left alone when re-quoting a URL: reserved ones and existing escapes.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and allowances for downloads (FETCH_ALLOWLIST, MAX_FILE_BYTES and friends)."""

    allowlist: tuple[str, ...] = ()
    max_file_bytes: int = 1 << 30
    connect_timeout: float = 10.0
    stall_timeout: float = 30.0
    total_timeout: float = 3600.0
    max_redirects: int = 5
    attempts: int = 3
    backoff: float = 0.5


class FetchError(Exception):
    """A file could not be downloaded; str() is `url: reason`."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class _Failure(Exception):
    """Why an exchange ended badly; transient ones are worth another attempt."""

    def __init__(self, reason: str, *, transient: bool = False, delay: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.delay = delay


def _classify(exc: BaseException) -> _Failure:
    """A human reason for whatever Tornado, the resolver or the socket raised."""
    if isinstance(exc, _Failure):
        return exc
    if isinstance(exc, AddressRefused):
        return _Failure(f"refused: {exc}")
    if isinstance(exc, HTTPTimeoutError):
        return _Failure(
            "timed out connecting" if "connect" in str(exc) else "timed out", transient=True
        )
    if isinstance(exc, socket.gaierror):
        return _Failure(
            f"cannot resolve the host ({exc.strerror})", transient=exc.errno == socket.EAI_AGAIN
        )
    if isinstance(exc, ssl.SSLError):
        return _Failure(f"TLS failed ({exc.reason or exc})")
    if isinstance(exc, ConnectionResetError):
        return _Failure("connection reset", transient=True)
    if isinstance(exc, OSError):
        return _Failure(f"connection failed ({exc.strerror or exc})", transient=True)
    if isinstance(exc, HTTPStreamClosedError | StreamClosedError):
        return _Failure("connection closed", transient=True)
    if isinstance(exc, HTTPInputError):
        return _Failure(f"bad response ({exc})")
    return _Failure(f"failed ({type(exc).__name__}: {exc})")


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class _Pipe:
    """Body chunks between the connection and the consumer, bounded in bytes."""

    def __init__(self, limit: int) -> None:
        self.buffered = 0
        self._limit = limit
        self._chunks: deque[Chunk] = deque()
        self._ended = False
        self._error: BaseException | None = None
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    def put(self, chunk: Chunk) -> asyncio.Future[None] | None:
        """Queue a chunk; if the pipe is now full, a future to await before the next."""
        self._chunks.append(chunk)
        self.buffered += len(chunk)
        _wake(self._readable)
        if self.buffered < self._limit:
            return None
        self._writable = asyncio.get_running_loop().create_future()
        return self._writable

    def end(self, error: BaseException | None = None) -> None:
        """No more chunks: a clean end, or `error` once the queued chunks are taken."""
        if not self._ended:
            self._ended, self._error = True, error
        _wake(self._readable)
        _wake(self._writable)

    async def get(self) -> Chunk | None:
        """The next chunk, None at a clean end; raises the error of an unclean one."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._readable = asyncio.get_running_loop().create_future()
            await self._readable
        chunk = self._chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered < self._limit:
            _wake(self._writable)
        return chunk


@dataclass(frozen=True)
class _Head:
    """A response's status line and headers, and the URL that answered."""

    url: str
    code: int
    reason: str
    headers: HTTPHeaders

    @property
    def status(self) -> str:
        """`answered 404 Not Found`."""
        return f"answered {self.code} {self.reason}".rstrip()


class _Exchange:
    """One HTTP request: its socket, response head, body pipe and stall watchdog."""

    def __init__(self, url: str, *, offset: int, policy: FetchPolicy) -> None:
        self.url = url
        self.pipe = _Pipe(PIPE_BYTES)
        self.head: _Head | None = None
        self._received = offset  # bytes of the file, earlier exchanges included
        self._limit = policy.max_file_bytes
        self._stall = policy.stall_timeout
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._blocked = False
        self._timer: asyncio.TimerHandle | None = None
        self._stream: IOStream | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._answered = asyncio.Event()

    async def response(self) -> _Head:
        """The response head, once in; raises why there is none."""
        await self._answered.wait()
        if self.head is None:
            raise self._error or _Failure("connection closed", transient=True)
        return self.head

    def connected(self, stream: IOStream) -> None:
        """Adopt the connected stream and start watching it for stalls."""
        if self._closed:  # abandoned while connecting: Tornado closes the stream on raise
            raise _Failure("closed")
        self._stream = stream
        self._touch()
        self._timer = self._loop.call_later(self._stall, self._watch)

    def answered(self, code: int, reason: str, headers: HTTPHeaders) -> None:
        """Record the response head."""
        self._touch()
        self.head = _Head(self.url, code, reason, headers)
        self._answered.set()

    def feed(self, chunk: Chunk) -> asyncio.Future[None] | None:
        """Hand a body chunk on; a returned future holds Tornado's reads until there is room."""
        if self._closed:
            return None
        self._touch()
        self._received += len(chunk)
        if self._received > self._limit:
            self.close(_Failure(f"larger than the limit of {self._limit} bytes"))
            return None
        room = self.pipe.put(chunk)
        if room is not None:
            self._blocked = True
            room.add_done_callback(self._unblocked)
        return room

    def finished(self, future: asyncio.Future[HTTPResponse]) -> None:
        """Tornado is done with the request: a clean end of the body, or its error."""
        self.close(None if future.cancelled() else future.exception())

    def close(self, error: BaseException | None) -> None:
        """Close the socket now and end the body (cleanly if `error` is None)."""
        if self._closed:
            return
        self._closed, self._error = True, error
        if self._timer is not None:
            self._timer.cancel()
        if self._stream is not None:
            self._stream.close()
        self.pipe.end(error)
        self._answered.set()

    def _touch(self) -> None:
        self._last = self._loop.time()

    def _unblocked(self, _room: asyncio.Future[None]) -> None:
        self._blocked = False
        self._touch()

    def _watch(self) -> None:
        idle = self._loop.time() - self._last
        if self._blocked or idle < self._stall:
            # A full pipe means the consumer is slow, not the origin: that is no stall.
            delay = self._stall if self._blocked else self._stall - idle
            self._timer = self._loop.call_later(delay, self._watch)
            return
        self.close(_Failure(f"stalled: no data for {self._stall:g} s", transient=True))


class _Request(HTTPRequest):
    """A request that knows the exchange its connection reports to."""

    def __init__(self, url: str, exchange: _Exchange, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.exchange = exchange


class _BodyReader(HTTP1Connection):
    """Tornado's HTTP/1 connection, reading a sized body straight into a buffer per chunk.

    Tornado's own reads allocate a zeroed buffer, append what the socket gave to the stream's
    buffer, and copy it out again: three copies per byte before the zipper sees it. Reading into
    a fresh buffer leaves only the socket's own. No one writes to a chunk's buffer once it is
    handed on, so it travels as a read-only view.
    """

    async def _read_fixed_body(
        self, content_length: int, delegate: httputil.HTTPMessageDelegate
    ) -> None:
        while content_length > 0:
            buffer = bytearray(min(self.params.chunk_size, content_length))
            received = await self.stream.read_into(buffer, partial=True)
            if received < len(buffer):
                del buffer[received:]
            content_length -= received
            await self._deliver_body(delegate, memoryview(buffer).toreadonly())  # type: ignore[arg-type]
            await asyncio.sleep(0)  # as Tornado does: other connections get their turn


class _Connection(_HTTPConnection):
    """Tornado's client connection, reporting to an `_Exchange` and honouring backpressure."""

    @property
    def exchange(self) -> _Exchange:
        """The exchange this connection serves."""
        request: Any = self.request
        if isinstance(request, _RequestProxy):
            request = request.request
        return cast(_Request, request).exchange

    def _create_connection(self, stream: IOStream) -> HTTP1Connection:
        self.exchange.connected(stream)
        # Bodies come in reads of up to READ_CHUNK rather than Tornado's 64 KiB: a sixteenth
        # (or less) of the callbacks, hand-offs and wake-ups per byte on the way to the zipper.
        stream.read_chunk_size = min(READ_CHUNK, stream.max_buffer_size // 2)
        stream.set_nodelay(True)
        # What Tornado's _create_connection builds, with our body reader; bodies are never
        # decompressed (the request says so, and a hostile gzip must not unpack here).
        params = HTTP1ConnectionParameters(
            no_keep_alive=True,
            max_header_size=self.max_header_size,
            max_body_size=self.max_body_size,
            decompress=False,
            chunk_size=READ_CHUNK,
        )
        return _BodyReader(stream, True, params, self._sockaddr)

    async def headers_received(
        self, first_line: ResponseStartLine | RequestStartLine, headers: HTTPHeaders
    ) -> None:
        """Tell the exchange the head is in."""
        await super().headers_received(first_line, headers)
        assert isinstance(first_line, ResponseStartLine)
        self.exchange.answered(first_line.code, first_line.reason, headers)

    def data_received(self, chunk: Chunk) -> Awaitable[None] | None:  # type: ignore[override]
        """Pass the chunk on and return the exchange's future: HTTP1Connection awaits it."""
        # Older Tornado releases dropped the streaming callback's return value (tornado#2209), so
        # reads never waited for the consumer; returning it here is what backpressure rests on.
        return self.exchange.feed(chunk)


class _Client(SimpleAsyncHTTPClient):
    """Tornado's simple client, with connections that report to exchanges."""

    def _connection_class(self) -> type:
        return _Connection


def _requote(url: str) -> str:
    """Escape what Tornado would otherwise write raw into the request line (spaces, non-ASCII)."""
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.quote(parts.path, safe=_URL_SAFE)
    query = urllib.parse.quote(parts.query, safe=_URL_SAFE)
    return parts._replace(path=path, query=query, fragment="").geturl()


def _url_name(url: str) -> str:
    """The URL's last path segment, percent-decoded."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])


def _disposition_name(headers: HTTPHeaders) -> str | None:
    """The Content-Disposition filename, `filename*` (RFC 5987) first."""
    value = headers.get("Content-Disposition")
    if not value:
        return None
    message = email.message.Message()
    message["Content-Disposition"] = value
    params: list[tuple[str, Any]] = message.get_params(header="content-disposition") or []
    plain, extended = None, None
    for key, param in params[1:]:
        if key.lower() != "filename":
            continue
        if isinstance(param, tuple):
            extended = email.utils.collapse_rfc2231_value(param)
        else:
            plain = param
    if extended:
        return extended
    return _utf8_from_latin1(plain) if plain else None


def _utf8_from_latin1(text: str) -> str:
    # Tornado decodes headers as Latin-1; origins that put raw UTF-8 in a filename mean UTF-8.
    try:
        return text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return text


def _length(headers: HTTPHeaders) -> int | None:
    value = headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


def _content_range(headers: HTTPHeaders) -> tuple[int, int | None] | None:
    """(first byte, total length or None) of a 206's Content-Range."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("Content-Range", "").strip())
    if match is None:
        return None
    total = match.group(2)
    return int(match.group(1)), int(total) if total.isdigit() else None


def _media_type(headers: HTTPHeaders) -> str | None:
    value = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    return value or None


def _validator(headers: HTTPHeaders) -> str | None:
    """What If-Range can carry, if the origin supports byte ranges at all."""
    if "bytes" not in headers.get("Accept-Ranges", "").lower():
        return None
    etag = headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):  # If-Range needs a strong validator
        return etag
    return headers.get("Last-Modified") or None


def _retry_after(headers: HTTPHeaders) -> float:
    """Seconds the origin asked to wait (0 if it did not say), capped."""
    value = headers.get("Retry-After", "").strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 0.0
        if when.tzinfo is None:
            return 0.0
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def _judge(head: _Head) -> _Head:
    """Pass a 2xx; raise a transient failure for 429/5xx and a final one for the rest."""
    if 200 <= head.code < 300:
        return head
    if head.code == 429 or head.code >= 500:
        raise _Failure(head.status, transient=True, delay=_retry_after(head.headers))
    raise _Failure(head.status)


class _Source:
    """One file across its requests: redirects, retries and resumption."""

    def __init__(self, fetcher: Fetcher, url: str) -> None:
        self.url = url
        self.size: int | None = None
        self.delivered = 0
        self._fetcher = fetcher
        self._policy = fetcher.policy
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + self._policy.total_timeout
        self._failures = 0
        self._exchange: _Exchange | None = None
        self._target = url  # where the file was found, after redirects
        self._validator: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet taken by the consumer."""
        return self._exchange.pipe.buffered if self._exchange else 0

    def close(self) -> None:
        """Drop the current request and its socket at once."""
        if self._exchange is not None:
            self._exchange.close(_Failure("closed"))

    async def start(self) -> Download:
        """Send the request and wait for a response that is a file."""
        head = await self._request(self.url, offset=0)
        if head.code != 200:
            raise FetchError(self.url, head.status)
        self.size = _length(head.headers)
        limit = self._policy.max_file_bytes
        if self.size is not None and self.size > limit:
            raise FetchError(self.url, f"larger than the limit ({self.size} > {limit} bytes)")
        html = _media_type(head.headers) == "text/html"
        if html and not _url_name(self.url).lower().endswith((".html", ".htm")):
            raise FetchError(self.url, "answered with an HTML page, not a file")
        self._target, self._validator = head.url, _validator(head.headers)
        name = _disposition_name(head.headers) or _url_name(self.url)
        return Download(self.url, name, self.size, _media_type(head.headers), _source=self)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The body, resuming after transient failures where the origin allows."""
        while True:
            assert self._exchange is not None
            try:
                chunk = await self._exchange.pipe.get()
            except Exception as exc:
                await self._resume(_classify(exc))
                continue
            if chunk is None:
                self._check_complete()
                return
            self.delivered += len(chunk)
            self._failures = 0  # progress: a later outage gets a full set of attempts
            yield chunk

    def _check_complete(self) -> None:
        if self.size is not None and self.delivered < self.size:
            raise FetchError(self.url, f"connection closed after {self._progress()}")

    def _progress(self) -> str:
        if self.size is None:
            return f"{self.delivered} bytes"
        return f"{self.delivered} of {self.size} bytes"

    async def _resume(self, failure: _Failure) -> None:
        """Carry on where the body broke off, or fail with how far it got."""
        if failure.transient:
            cause = failure.reason
            if cause == "connection closed" and self.size is None:
                cause = "connection lost"  # no length to say it closed early, only that it broke
            reason = f"{cause} after {self._progress()}"
            resumable = self._validator is not None or self.delivered == 0
            if not resumable:
                reason += "; the origin does not support resuming"
            failure = _Failure(reason, transient=resumable)
        await self._retry_or_raise(failure)
        head = await self._request(self._target, offset=self.delivered)
        self._check_resumed(head)

    def _check_resumed(self, head: _Head) -> None:
        """A ranged response must continue exactly where the body broke off."""
        if self.delivered == 0:  # nothing reached the consumer: a fresh copy will do
            if head.code != 200 or _length(head.headers) != self.size:
                raise FetchError(self.url, f"the file changed while downloading ({head.status})")
            return
        if head.code != 206:
            raise FetchError(self.url, f"the origin did not resume ({head.status})")
        span = _content_range(head.headers)
        total = span[1] if span else None
        if (
            span is None
            or span[0] != self.delivered
            or (self.size is not None and total != self.size)
        ):
            raise FetchError(self.url, "the origin resumed at the wrong offset")

    async def _request(self, url: str, *, offset: int) -> _Head:
        """An exchange that answered 2xx: redirects followed, transient failures retried."""
        while True:
            try:
                return await self._follow(url, offset)
            except _Failure as failure:
                await self._retry_or_raise(failure)

    async def _retry_or_raise(self, failure: _Failure) -> None:
        """Close the exchange, then back off if another attempt is due, else raise."""
        self.close()
        now = self._loop.time()
        if now >= self._deadline:
            raise FetchError(self.url, f"timed out after {self._policy.total_timeout:g} s")
        self._failures += 1
        if not failure.transient or self._failures >= self._policy.attempts:
            raise FetchError(self.url, failure.reason) from failure
        backoff = self._policy.backoff * 2 ** (self._failures - 1)
        delay = max(backoff, failure.delay)
        if now + delay >= self._deadline:
            raise FetchError(self.url, failure.reason) from failure
        await asyncio.sleep(delay)

    async def _follow(self, url: str, offset: int) -> _Head:
        for _hop in range(self._policy.max_redirects + 1):
            head = await self._send(url, offset)
            location = head.headers.get("Location")
            if head.code not in _REDIRECTS or not location:
                return _judge(head)
            self.close()
            url = urllib.parse.urljoin(url, location)
        raise _Failure(f"too many redirects (more than {self._policy.max_redirects})")

    async def _send(self, url: str, offset: int) -> _Head:
        """Start one request (every hop goes through the guarded resolver) and await its head."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Failure(f"not an http(s) URL ({url[:100]})")
        remaining = self._deadline - self._loop.time()
        if remaining <= 0:  # Tornado reads a zero timeout as none at all
            raise _Failure("timed out")
        self._exchange = exchange = _Exchange(url, offset=offset, policy=self._policy)
        request = _Request(
            _requote(url),
            exchange,
            headers=self._headers(offset),
            connect_timeout=min(self._policy.connect_timeout, remaining),
            request_timeout=remaining,
            follow_redirects=False,
            decompress_response=False,  # the file is the bytes sent; no gunzip of hostile bodies
            streaming_callback=exchange.feed,
        )
        self._fetcher._http_client().fetch(request, raise_error=False).add_done_callback(
            exchange.finished
        )
        try:
            return await exchange.response()
        except Exception as exc:
            raise _classify(exc) from exc

    def _headers(self, offset: int) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity", "User-Agent": "Satchel"}
        if offset and self._validator is not None:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = self._validator
        return headers


@dataclass
class Download:
    """One file being received: what the origin said about it, and its body as it arrives."""

    url: str
    name: str  # Content-Disposition filename or the URL's last segment; the zipper sanitises it
    size: int | None
    content_type: str | None  # media type only, lowercase, without parameters
    _source: _Source = field(repr=False, compare=False)

    @property
    def buffered(self) -> int:
        """Bytes received from the origin but not yet taken by the consumer."""
        return self._source.buffered

    def __aiter__(self) -> AsyncIterator[Chunk]:
        """The body in chunks; the socket is read no faster than they are taken."""
        return self._source.chunks()


class Fetcher:
    """Downloads files under a FetchPolicy; one instance serves many downloads at once."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._address_policy = AddressPolicy.parse(policy.allowlist)  # malformed: fail at start
        self._client: _Client | None = None
        self._resolver: GuardedResolver | None = None

    def open(self, url: str) -> AbstractAsyncContextManager[Download]:
        """Request `url`; enter once a file's headers are in, exit to close its socket at once."""
        return self._open(url)

    @contextlib.asynccontextmanager
    async def _open(self, url: str) -> AsyncIterator[Download]:
        source = _Source(self, url)
        try:
            yield await source.start()
        finally:
            source.close()

    def _http_client(self) -> SimpleAsyncHTTPClient:
        """The HTTP client, made on first use so it belongs to the running loop."""
        if self._client is None:
            self._resolver = GuardedResolver(policy=self._address_policy)
            self._client = _Client(
                force_instance=True,
                resolver=self._resolver,
                max_clients=_MAX_CLIENTS,
                max_buffer_size=_STREAM_BUFFER,
                max_body_size=_TORNADO_MAX_BODY,
            )
        return self._client

    async def close(self) -> None:
        """Release the client and resolver; call once the downloads have ended."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._resolver is not None:
            self._resolver.close()
            self._resolver = None
