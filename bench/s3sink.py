"""A loopback S3 stand-in that discards object bodies, for `bench.archive`'s memory phase.

`python -m bench.s3sink` listens on HOST:PORT (127.0.0.1:8003 by default) and answers the S3
calls Satchel's archive runs make, path-style, unsigned checks and all:

    HEAD/PUT /BUCKET (and ?lifecycle)           the bucket always exists
    POST /BUCKET/KEY?uploads                    create a multipart upload
    PUT  /BUCKET/KEY?partNumber=N&uploadId=U    a part: counted, only the last two kept
    POST /BUCKET/KEY?uploadId=U                 complete: the object is its size and tail
    DELETE /BUCKET/KEY?uploadId=U               abort
    GET  /BUCKET/KEY?uploadId=U                 list parts (NoSuchUpload once gone)
    GET/HEAD /BUCKET/KEY (with Range)           only ranges within the kept tail
    GET  /BUCKET?list-type=2&prefix=P           list objects
    DELETE /BUCKET/KEY                          delete

Why: moto builds a completed object from several whole copies of it (about 4x its size at the
peak, and about 10 s per GiB), so a 4 GiB archive would need some 17 GiB of RAM and outlast
Satchel's 60 s S3 read timeout. Satchel's own memory does not depend on what S3 keeps, and the
tail is enough for the verification (the ZIP's central directory is at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import signal
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import parse_qs, unquote, urlsplit

KEEP_PARTS = 2
READ = 1 << 20
XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
_ids = itertools.count(1)


@dataclass
class Upload:
    """A multipart upload in progress: sizes of its parts, bytes of its last ones."""

    key: str
    sizes: dict[int, int] = field(default_factory=dict)
    kept: dict[int, bytes] = field(default_factory=dict)


@dataclass
class StoredObject:
    """A completed object: its size and its last bytes."""

    size: int
    tail: bytes
    etag: str
    modified: float

    @property
    def tail_start(self) -> int:
        """Offset of the first kept byte."""
        return self.size - len(self.tail)


class Problem(Exception):
    """An S3 error answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Request:
    """One parsed request head."""

    method: str
    bucket: str
    key: str
    query: dict[str, str]
    headers: dict[str, str]


class Sink:
    """The state: uploads and objects by key, all buckets shared."""

    def __init__(self) -> None:
        self.uploads: dict[str, Upload] = {}
        self.objects: dict[str, StoredObject] = {}
        self.bytes_received = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one keep-alive connection."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                request = _parse(head)
                if request.headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                try:
                    status, headers, body = await self._dispatch(request, reader)
                except Problem as problem:
                    await _drain_body(request, reader)
                    status, headers, body = _error(problem)
                _respond(writer, request.method, status, headers, body)
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _dispatch(
        self, r: Request, reader: asyncio.StreamReader
    ) -> tuple[int, dict[str, str], bytes]:
        if not r.bucket:
            return 200, {}, _xml("ListAllMyBucketsResult", "<Buckets></Buckets>")
        if not r.key:
            await _drain_body(r, reader)
            if r.method == "GET" and "list-type" in r.query:
                return self._list(r.bucket, r.query.get("prefix", ""))
            return 200, {}, b""
        name = f"{r.bucket}/{r.key}"
        if r.method == "POST" and "uploads" in r.query:
            upload_id = f"sink-{next(_ids)}-{os.getpid()}"
            self.uploads[upload_id] = Upload(name)
            inner = f"<Bucket>{r.bucket}</Bucket><Key>{r.key}</Key><UploadId>{upload_id}</UploadId>"
            return 200, {}, _xml("InitiateMultipartUploadResult", inner)
        if "uploadId" in r.query:
            return await self._upload_call(r, reader, name, self._upload(r.query["uploadId"]))
        await _drain_body(r, reader)
        if r.method == "DELETE":
            self.objects.pop(name, None)
            return 204, {}, b""
        if r.method in ("GET", "HEAD"):
            return self._get(r, name)
        raise Problem(501, "NotImplemented", f"{r.method} of an object is not supported")

    async def _upload_call(
        self, r: Request, reader: asyncio.StreamReader, name: str, upload: Upload
    ) -> tuple[int, dict[str, str], bytes]:
        upload_id = r.query["uploadId"]
        if r.method == "PUT":
            number = int(r.query["partNumber"])
            keep = number >= max(upload.sizes, default=0) - KEEP_PARTS + 1
            size, data = await _read_body(r, reader, keep=keep)
            self.bytes_received += size
            upload.sizes[number] = size
            if keep:
                upload.kept[number] = data
            for old in sorted(upload.kept)[:-KEEP_PARTS]:
                del upload.kept[old]
            return 200, {"ETag": _etag(f"{upload_id}/{number}/{size}")}, b""
        await _drain_body(r, reader)
        if r.method == "DELETE":
            del self.uploads[upload_id]
            return 204, {}, b""
        if r.method == "GET":
            parts = "".join(
                f"<Part><PartNumber>{n}</PartNumber><Size>{s}</Size></Part>"
                for n, s in sorted(upload.sizes.items())
            )
            return 200, {}, _xml("ListPartsResult", f"<UploadId>{upload_id}</UploadId>{parts}")
        if r.method == "POST":
            return self._complete(r, name, upload_id, upload)
        raise Problem(501, "NotImplemented", f"{r.method} of an upload is not supported")

    def _complete(
        self, r: Request, name: str, upload_id: str, upload: Upload
    ) -> tuple[int, dict[str, str], bytes]:
        numbers = sorted(upload.sizes)
        last = numbers[-KEEP_PARTS:]
        if [n for n in last if n not in upload.kept]:
            raise Problem(400, "InvalidPart", "the last parts were not kept")
        tail = b"".join(upload.kept[n] for n in last)
        etag = _etag(f"{upload_id}/{len(numbers)}")
        self.objects[name] = StoredObject(sum(upload.sizes.values()), tail, etag, time.time())
        del self.uploads[upload_id]
        inner = f"<Bucket>{r.bucket}</Bucket><Key>{r.key}</Key><ETag>{etag}</ETag>"
        return 200, {}, _xml("CompleteMultipartUploadResult", inner)

    def _upload(self, upload_id: str) -> Upload:
        upload = self.uploads.get(upload_id)
        if upload is None:
            raise Problem(404, "NoSuchUpload", "The specified upload does not exist.")
        return upload

    def _get(self, r: Request, name: str) -> tuple[int, dict[str, str], bytes]:
        stored = self.objects.get(name)
        if stored is None:
            raise Problem(404, "NoSuchKey", "The specified key does not exist.")
        headers = {
            "ETag": stored.etag,
            "Last-Modified": formatdate(stored.modified, usegmt=True),
            "Content-Type": "application/zip",
            "Accept-Ranges": "bytes",
        }
        wanted = r.headers.get("range", "")
        if r.method == "HEAD" or not wanted:
            if r.method == "GET" and stored.tail_start:
                raise Problem(501, "NotImplemented", "only ranges within the tail are kept")
            headers["Content-Length"] = str(stored.size)
            return 200, headers, b"" if r.method == "HEAD" else stored.tail
        first, last = _range(wanted, stored.size)
        if first < stored.tail_start:
            raise Problem(501, "NotImplemented", "only ranges within the tail are kept")
        headers["Content-Range"] = f"bytes {first}-{last}/{stored.size}"
        start = first - stored.tail_start
        return 206, headers, stored.tail[start : start + last - first + 1]

    def _list(self, bucket: str, prefix: str) -> tuple[int, dict[str, str], bytes]:
        contents = "".join(
            f"<Contents><Key>{name.split('/', 1)[1]}</Key><Size>{stored.size}</Size>"
            f"<ETag>{stored.etag}</ETag><LastModified>"
            f"{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(stored.modified))}"
            "</LastModified><StorageClass>STANDARD</StorageClass></Contents>"
            for name, stored in sorted(self.objects.items())
            if name.startswith(f"{bucket}/{prefix}")
        )
        count = contents.count("<Contents>")
        inner = (
            f"<Name>{bucket}</Name><Prefix>{prefix}</Prefix><KeyCount>{count}</KeyCount>"
            f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{contents}"
        )
        return 200, {}, _xml("ListBucketResult", inner)


def _parse(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, target = [*lines[0].split(" "), "", ""][:2]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    parts = urlsplit(target)
    bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return Request(method, bucket, key, query, headers)


async def _read_body(r: Request, reader: asyncio.StreamReader, *, keep: bool) -> tuple[int, bytes]:
    """The body's length, and its bytes when `keep`; plain or chunked (aws-chunked too)."""
    kept = bytearray()
    size = 0
    if "chunked" in r.headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            length = int(line.split(b";", 1)[0].strip(), 16)
            if length == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers (aws-chunked checksums)
                break
            data = await reader.readexactly(length)
            await reader.readexactly(2)
            size += length
            if keep:
                kept += data
    else:
        left = int(r.headers.get("content-length", "0"))
        while left:
            data = await reader.read(min(READ, left))
            if not data:
                raise ConnectionError("body cut short")
            left -= len(data)
            size += len(data)
            if keep:
                kept += data
    return size, bytes(kept)


async def _drain_body(r: Request, reader: asyncio.StreamReader) -> None:
    await _read_body(r, reader, keep=False)


def _range(header: str, size: int) -> tuple[int, int]:
    spec = header.removeprefix("bytes=")
    first, _, last = spec.partition("-")
    if not first:
        return max(0, size - int(last)), size - 1
    return int(first), min(size - 1, int(last)) if last else size - 1


def _etag(seed: str) -> str:
    return f'"{hashlib.md5(seed.encode(), usedforsecurity=False).hexdigest()}"'


def _xml(root: str, inner: str) -> bytes:
    text = f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{XMLNS}">{inner}</{root}>'
    return text.encode()


def _error(problem: Problem) -> tuple[int, dict[str, str], bytes]:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
        f"<Code>{problem.code}</Code><Message>{problem.message}</Message></Error>"
    ).encode()
    return problem.status, {"Content-Type": "application/xml"}, body


_REASONS = {200: "OK", 204: "No Content", 206: "Partial Content", 400: "Bad Request"}
_REASONS |= {404: "Not Found", 501: "Not Implemented"}


def _respond(
    writer: asyncio.StreamWriter, method: str, status: int, headers: dict[str, str], body: bytes
) -> None:
    head = {"Content-Type": "application/xml", **headers}
    if status != 204:
        head.setdefault("Content-Length", str(len(body)))
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{name}: {value}" for name, value in head.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    if method != "HEAD" and status != 204:
        writer.write(body)


async def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    sink = Sink()
    host = os.environ.get("HOST", "127.0.0.1")
    server = await asyncio.start_server(
        sink.handle, host, int(os.environ.get("PORT", "8003")), limit=64 * 1024
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    async with server:
        await stopping.wait()
    print(f"s3sink: {sink.bytes_received} part bytes received and dropped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
