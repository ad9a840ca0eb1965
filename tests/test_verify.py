"""verify_archive: an uploaded archive's central directory read back and compared."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from storage.multipart import MIB, MultipartUpload
from tasks import verify
from tasks.verify import ArchiveMismatch, verify_archive
from tasks.zipper import ArchiveStream, EntryRecord


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """`data` in chunks."""
    for at in range(0, len(data), size):
        yield data[at : at + size]


Files = Sequence[tuple[str, bytes, bool]]


async def stream_to_s3(s3: Any, bucket: str, key: str, files: Files) -> ArchiveStream:
    """Form an archive of `files` and upload it as it forms, as the archive job does."""
    stream = ArchiveStream()
    async with MultipartUpload(s3, bucket, key, part_size=5 * MIB) as upload:

        async def pump() -> None:
            async for piece in stream:
                await upload.write(piece)

        pumping = asyncio.create_task(pump())
        for name, data, compress in files:
            await stream.add(name, chunks_of(data), compress=compress)
        await stream.close()
        await pumping
        assert await upload.complete() == stream.bytes_out
    return stream


async def put(s3: Any, bucket: str, key: str, body: bytes) -> None:
    """Store `body` as one object."""
    await s3.put_object(Bucket=bucket, Key=key, Body=body)


async def fetch(s3: Any, bucket: str, key: str) -> bytes:
    """An object's bytes."""
    reply = await s3.get_object(Bucket=bucket, Key=key)
    async with reply["Body"] as body:
        data: bytes = await body.read()
    return data


FILES: Files = [
    ("photo.jpg", os.urandom(7 * MIB), False),
    ("notes.txt", b"line of text\n" * 50_000, True),
    ("\u00fcber \u2013 caf\u00e9.txt", b"non-ASCII name\n", True),
    ("empty.bin", b"", False),
]


async def test_streamed_archive_verifies(s3: Any, bucket: str) -> None:
    stream = await stream_to_s3(s3, bucket, "ok.zip", FILES)
    assert stream.bytes_out > 5 * MIB  # more than one part
    await verify_archive(s3, bucket, "ok.zip", expected=stream.entries, size=stream.bytes_out)


async def test_directory_beyond_the_tail_is_fetched_by_range(s3: Any, bucket: str) -> None:
    files = [(f"{i:04d}-{'long name ' * 8}.txt", b"%d" % i, i % 3 == 0) for i in range(1500)]
    stream = await stream_to_s3(s3, bucket, "many.zip", files)
    directory_bytes = sum(46 + len(e.name) for e in stream.entries)
    assert directory_bytes > verify.TAIL_BYTES
    await verify_archive(s3, bucket, "many.zip", expected=stream.entries, size=stream.bytes_out)


def _first_record(archive: bytes) -> int:
    return archive.index(b"PK\x01\x02")


def change_crc(archive: bytes) -> bytes:
    """Flip a bit of the first entry's CRC in the central directory."""
    at = _first_record(archive) + 16
    return archive[:at] + bytes([archive[at] ^ 1]) + archive[at + 1 :]


def change_size(archive: bytes) -> bytes:
    """Claim a different uncompressed size for the first entry."""
    at = _first_record(archive) + 24
    (size,) = struct.unpack_from("<L", archive, at)
    return archive[:at] + struct.pack("<L", size + 1) + archive[at + 4 :]


def change_name(archive: bytes) -> bytes:
    """Rename the first entry in the central directory."""
    return archive.replace(b"photo.jpg", b"photo.jpx")


def append_byte(archive: bytes) -> bytes:
    """One byte more than was streamed."""
    return archive + b"\0"


def cut_the_end(archive: bytes) -> bytes:
    """Lose the end records."""
    return archive[:-22]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (change_crc, "entry 0"),
        (change_size, "entry 0"),
        (change_name, "entry 0"),
        (append_byte, "bytes"),
        (cut_the_end, "bytes"),
    ],
)
async def test_tampered_object_is_refused(
    s3: Any, bucket: str, tamper: Callable[[bytes], bytes], reason: str
) -> None:
    stream = await stream_to_s3(s3, bucket, "good.zip", FILES)
    tampered = tamper(await fetch(s3, bucket, "good.zip"))
    await put(s3, bucket, "bad.zip", tampered)
    with pytest.raises(ArchiveMismatch, match=reason):
        await verify_archive(s3, bucket, "bad.zip", expected=stream.entries, size=stream.bytes_out)
    # Sized as the tampered object, the end records are still checked.
    if reason == "bytes":
        with pytest.raises(ArchiveMismatch, match="end of central directory"):
            await verify_archive(s3, bucket, "bad.zip", expected=stream.entries, size=len(tampered))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda e: e[:-1], "4 entries listed, 3"),
        (lambda e: [*e, EntryRecord("extra.txt", 1, 1, 0)], "4 entries listed, 5"),
        (lambda e: [e[0], dataclasses.replace(e[1], crc=e[1].crc ^ 1), *e[2:]], "entry 1"),
        (lambda e: [e[0], dataclasses.replace(e[1], compressed_size=1), *e[2:]], "entry 1"),
        (lambda e: [*e[:3], dataclasses.replace(e[3], size=1)], "entry 3"),
        (lambda e: [e[1], e[0], *e[2:]], "entry 0"),
    ],
    ids=["one-missing", "one-extra", "crc", "compressed-size", "size", "order"],
)
async def test_differences_from_what_was_streamed_are_refused(
    s3: Any,
    bucket: str,
    change: Callable[[list[EntryRecord]], list[EntryRecord]],
    reason: str,
) -> None:
    stream = await stream_to_s3(s3, bucket, "a.zip", FILES)
    expected = change(list(stream.entries))
    with pytest.raises(ArchiveMismatch, match=reason):
        await verify_archive(s3, bucket, "a.zip", expected=expected, size=stream.bytes_out)


async def test_missing_entry_in_the_object_is_refused(s3: Any, bucket: str) -> None:
    full = await stream_to_s3(s3, bucket, "full.zip", FILES)
    await stream_to_s3(s3, bucket, "short.zip", FILES[:-1])
    short_size = (await s3.head_object(Bucket=bucket, Key="short.zip"))["ContentLength"]
    with pytest.raises(ArchiveMismatch, match="3 entries listed, 4"):
        await verify_archive(s3, bucket, "short.zip", expected=full.entries, size=short_size)


@pytest.mark.slow
async def test_zip64_archive_of_65537_entries_verifies(s3: Any, bucket: str) -> None:
    files = [(f"{i:05d}.txt", b"%d\n" % i, i % 2 == 0) for i in range(65_537)]
    stream = await stream_to_s3(s3, bucket, "zip64.zip", files)
    tail = await fetch(s3, bucket, "zip64.zip")
    assert b"PK\x06\x06" in tail[-200:]  # a ZIP64 end record was needed, and is read
    await verify_archive(s3, bucket, "zip64.zip", expected=stream.entries, size=stream.bytes_out)
    with pytest.raises(ArchiveMismatch, match="65537 entries listed, 65536"):
        await verify_archive(
            s3, bucket, "zip64.zip", expected=stream.entries[1:], size=stream.bytes_out
        )
