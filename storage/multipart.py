"""Streaming multipart upload of one archive with aiobotocore, and the archive bucket itself.

Whatever goes wrong while the caller feeds an upload, the upload must be aborted, or S3 keeps
(and bills) its parts. Either

    upload = MultipartUpload(client, bucket, key, part_size=part_size_for(max_bytes))
    await upload.start()
    try:
        async for piece in archive:
            await upload.write(piece)
        size = await upload.complete()
    except BaseException:
        await upload.abort()
        raise

or `async with MultipartUpload(...) as upload:` around the same writes and `complete()`; the block
aborts the upload on any error or cancellation, and never completes it by itself.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
from types import TracebackType
from typing import Any

from botocore.exceptions import ClientError
from isal import isal_zlib

from storage.partbody import PartBody

log = logging.getLogger("satchel.multipart")

MIB = 1024 * 1024
# Well above S3's 5 MiB floor: fewer requests per archive, and faster parts on real networks.
MIN_PART = 8 * MIB
# S3's limits: parts per upload, the smallest part but the last, the largest part and object.
MAX_PARTS = 10_000
S3_MIN_PART = 5 * MIB
S3_MAX_PART = 5 * 1024 * MIB
S3_MAX_OBJECT = 5 * 1024 * 1024 * MIB
# S3 documents that an abort racing in-progress part uploads may need repeating.
ABORT_ATTEMPTS = 3
ABORT_BACKOFF = 0.5
# Only the servers Satchel creates buckets on get this rule; an operator's rules are theirs.
ABORT_RULE_ID = "satchel-abort-incomplete-multipart-uploads"
ABORT_AFTER_DAYS = 1
# Every part carries its CRC-32, which S3 checks before it stores the part, and the object gets
# a composite CRC-32. Computed here with ISA-L (over 20 GB/s), so botocore does not compute one
# itself with Python's zlib, five times slower, on the event loop. S3-compatible servers without
# checksums are run with AWS_REQUEST_CHECKSUM_CALCULATION=when_required, which turns this off too.
CHECKSUM = {"ChecksumAlgorithm": "CRC32"}


class UploadError(Exception):
    """A multipart upload failed, or could not be confirmed aborted."""


def part_size_for(max_archive_bytes: int) -> int:
    """The part size (>= MIN_PART, whole MiB) that fits `max_archive_bytes` in MAX_PARTS parts."""
    if not 0 < max_archive_bytes <= S3_MAX_OBJECT:
        raise ValueError(f"an archive limit of {max_archive_bytes} bytes does not fit in S3")
    per_part = -(-max_archive_bytes // MAX_PARTS)
    return max(MIN_PART, -(-per_part // MIB) * MIB)


class MultipartUpload:
    """One object written as a stream: full parts ship while later bytes are still coming."""

    def __init__(
        self, client: Any, bucket: str, key: str, *, part_size: int, parts_in_flight: int = 3
    ) -> None:
        if not S3_MIN_PART <= part_size <= S3_MAX_PART:
            raise ValueError(f"S3 parts hold 5 MiB to 5 GiB, not {part_size} bytes")
        if parts_in_flight < 1:
            raise ValueError("at least one part must be able to upload")
        self.client = client
        self.bucket = bucket
        self.key = key
        self.part_size = part_size
        self.upload_id: str | None = None
        self.bytes_uploaded = 0
        # Written bytes not yet shipped, as written: a part is copied from them once, into a
        # part buffer; at most `parts_in_flight` buffers exist, each reused for later parts.
        self._pieces: collections.deque[bytes | memoryview] = collections.deque()
        self._buffered = 0
        self._free_buffers: list[bytearray] = []
        self._next_part = 1
        self._parts: dict[int, dict[str, Any]] = {}
        self._checksums = _wants_checksums(client)
        self._slots = asyncio.Semaphore(parts_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self._completed = False
        self._aborting: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MultipartUpload:
        """Start the upload unless it was started already."""
        if self.upload_id is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Abort unless `complete()` succeeded; the block's own exception, if any, wins."""
        if self._completed:
            return
        if exc is None:
            log.warning("upload of %s left without complete(): aborting it", self.key)
            await self.abort()
            return
        try:
            await self.abort()
        except Exception:
            # The caller's error is the one worth raising; the upload id is on record for a
            # later `abort_upload`, and the bucket's lifecycle rule is the last resort.
            log.exception("could not abort upload %s of %s", self.upload_id, self.key)

    async def start(self) -> str:
        """Create the multipart upload; return its id."""
        if self.upload_id is not None or self._aborting is not None:
            raise RuntimeError("the upload has started or been aborted already")
        checksum = CHECKSUM if self._checksums else {}
        reply = await self.client.create_multipart_upload(
            Bucket=self.bucket, Key=self.key, ContentType="application/zip", **checksum
        )
        self.upload_id = str(reply["UploadId"])
        return self.upload_id

    async def write(self, data: bytes | memoryview) -> None:
        """Buffer `data` (kept, not copied); ship each full part, waiting while `parts_in_flight`
        are uploading."""
        self._check_writable()
        if data:
            self._pieces.append(data)
            self._buffered += len(data)
        while self._buffered >= self.part_size:
            await self._ship(self.part_size)

    async def complete(self) -> int:
        """Ship the last part (however small), complete the object; return its size."""
        self._check_writable()
        if self._buffered or self._next_part == 1:
            await self._ship(self._buffered)
        await asyncio.gather(*self._in_flight)
        self._check_writable()
        parts = [self._parts[number] for number in sorted(self._parts)]
        await self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": parts},
        )
        self._completed = True
        return self.bytes_uploaded

    async def abort(self) -> None:
        """Abort and confirm the upload is gone; idempotent, and finishes even if cancelled."""
        if self._aborting is None:
            self._aborting = asyncio.create_task(self._abort())
            self._aborting.add_done_callback(_log_abort_failure)
        await asyncio.shield(self._aborting)

    async def _abort(self) -> None:
        self._failure = self._failure or UploadError("the upload was aborted")
        for task in self._in_flight:
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._pieces.clear()
        self._buffered = 0
        self._free_buffers.clear()
        if self.upload_id is not None and not self._completed:
            await abort_upload(self.client, self.bucket, self.key, self.upload_id)

    def _check_writable(self) -> None:
        if self.upload_id is None:
            raise RuntimeError("start() the upload first")
        if self._failure is not None:
            raise UploadError(f"upload of {self.key} failed") from self._failure
        if self._completed:
            raise RuntimeError("the upload is complete")

    async def _ship(self, size: int) -> None:
        """Upload the first `size` written bytes as the next part, once a slot is free."""
        await self._slots.acquire()
        if self._failure is not None or self._next_part > MAX_PARTS:
            self._slots.release()
            self._check_writable()
            raise UploadError(f"{self.key} needs more than {MAX_PARTS} parts of {self.part_size}")
        body = self._take(size)
        number, self._next_part = self._next_part, self._next_part + 1
        task = asyncio.create_task(self._upload_part(number, body))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def _take(self, size: int) -> PartBody:
        """The first `size` buffered bytes, copied into a part buffer (a part's only copy)."""
        # A buffer is never short: pooled ones are whole parts, a new one is what this part needs
        # (a short last part's is not pooled).
        buffer = self._free_buffers.pop() if self._free_buffers else bytearray(size)
        with memoryview(buffer) as target:
            filled = 0
            while filled < size:
                piece = self._pieces[0]
                room = size - filled
                if len(piece) <= room:
                    target[filled : filled + len(piece)] = self._pieces.popleft()
                    filled += len(piece)
                else:
                    view = memoryview(piece)
                    target[filled:size] = view[:room]
                    self._pieces[0] = view[room:]
                    filled = size
        self._buffered -= size
        return PartBody(buffer, size)

    async def _upload_part(self, number: int, body: PartBody) -> None:
        try:
            checksum = {"ChecksumCRC32": part_checksum(body.view)} if self._checksums else {}
            reply = await self.client.upload_part(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=body,
                **checksum,
            )
            self._parts[number] = {"PartNumber": number, "ETag": str(reply["ETag"]), **checksum}
            self.bytes_uploaded += len(body)
        except Exception as exc:
            # Kept for the writer's next call: nobody awaits this task until complete().
            self._failure = self._failure or exc
        finally:
            if len(body.buffer) == self.part_size and self._aborting is None:
                self._free_buffers.append(body.buffer)
            self._slots.release()


def _wants_checksums(client: Any) -> bool:
    """Whether the client's configuration asks for checksums where S3 supports them."""
    config = getattr(getattr(client, "meta", None), "config", None)
    return getattr(config, "request_checksum_calculation", "when_supported") != "when_required"


def part_checksum(body: bytes | memoryview) -> str:
    """A part's CRC-32 as S3 takes it: four big-endian bytes in base64."""
    return base64.b64encode(isal_zlib.crc32(body).to_bytes(4, "big")).decode()


def _log_abort_failure(task: asyncio.Task[None]) -> None:
    # A shielded abort may outlive its cancelled caller; its failure must not go unheard.
    if not task.cancelled() and task.exception() is not None:
        log.error("aborting a multipart upload failed", exc_info=task.exception())


async def abort_upload(client: Any, bucket: str, key: str, upload_id: str) -> None:
    """Abort the multipart upload `upload_id` and confirm it is gone (e.g. a dead run's)."""
    for attempt in range(ABORT_ATTEMPTS):
        if attempt:
            await asyncio.sleep(ABORT_BACKOFF * attempt)
        with contextlib.suppress(ClientError):
            await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        if await _upload_gone(client, bucket, key, upload_id):
            return
    raise UploadError(f"multipart upload {upload_id} of {key} is still there after abort")


async def _upload_gone(client: Any, bucket: str, key: str, upload_id: str) -> bool:
    try:
        await client.list_parts(Bucket=bucket, Key=key, UploadId=upload_id, MaxParts=1)
    except ClientError as exc:
        if _code(exc) == "NoSuchUpload":
            return True
        log.warning("cannot confirm upload %s is gone: %s", upload_id, exc)
    return False


async def ensure_bucket(client: Any, bucket: str, *, region: str) -> None:
    """Create `bucket` if missing, with a rule that expires incomplete uploads after a day."""
    if await _bucket_exists(client, bucket):
        return
    options: dict[str, Any] = {}
    if region != "us-east-1":  # the one region S3 refuses an explicit constraint for
        options["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        await client.create_bucket(Bucket=bucket, **options)
    except ClientError as exc:
        if _code(exc) == "BucketAlreadyOwnedByYou":
            return  # another instance won the race; it adds the rule
        raise
    await _add_abort_rule(client, bucket)


async def _bucket_exists(client: Any, bucket: str) -> bool:
    try:
        await client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise
    return True


async def _add_abort_rule(client: Any, bucket: str) -> None:
    rule = {
        "ID": ABORT_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_AFTER_DAYS},
    }
    try:
        await client.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": [rule]}
        )
    except ClientError as exc:
        # Some S3-compatible servers have no lifecycle support; aborts still clean up.
        log.warning("bucket %s has no lifecycle rule for incomplete uploads: %s", bucket, exc)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
