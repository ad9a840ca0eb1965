"""Read an uploaded archive's central directory back with ranged GETs and compare it.

Only the tail (end records) and the central directory are fetched, never the entries' data:
the check costs a few requests and a few bytes per entry whatever the archive's size.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.zipper import EntryRecord

# The end of central directory record may carry a comment of up to 64 KiB, and ZIP64 puts its
# locator (20 bytes) and usually its record (56 bytes) right before it.
TAIL_BYTES = 22 + 0xFFFF + 20 + 56
# Read the central directory in slices: memory stays flat for any number of entries.
DIRECTORY_CHUNK = 256 * 1024
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_EXTRA_HEADER = struct.Struct("<HH")
_EOCD_SIGNATURE = b"PK\x05\x06"
_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_ZIP64_EXTRA_ID = 0x0001
_UTF8_FLAG = 0x800
_CONTENT_RANGE = re.compile(r"bytes \d+-\d+/(\d+)")


class ArchiveMismatch(Exception):
    """The stored archive is not the one that was streamed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Directory:
    """Where the central directory is, by the end records."""

    count: int
    size: int
    offset: int
    end: int  # where the end records start: the directory must run right up to it


@dataclass(frozen=True)
class _Tail:
    """The object's last bytes, where they start, and the object's size."""

    data: bytes
    start: int
    total: int

    def slice(self, offset: int, length: int) -> bytes | None:
        """Bytes at an absolute `offset`, when the tail holds them all."""
        if offset < self.start or offset + length > self.total:
            return None
        return self.data[offset - self.start : offset - self.start + length]


async def verify_archive(
    client: Any, bucket: str, key: str, *, expected: Sequence[EntryRecord], size: int
) -> None:
    """Raise ArchiveMismatch unless the object is `size` bytes and lists exactly `expected`."""
    tail = await _read_tail(client, bucket, key)
    if tail.total != size:
        raise ArchiveMismatch(f"the object holds {tail.total} bytes, {size} were streamed")
    directory = await _locate_directory(client, bucket, key, tail)
    if directory.count != len(expected):
        raise ArchiveMismatch(f"{directory.count} entries listed, {len(expected)} were streamed")
    if directory.offset + directory.size != directory.end:
        raise ArchiveMismatch("the central directory does not end where the end records start")
    await _compare_directory(client, bucket, key, tail, directory, expected)


async def _read_tail(client: Any, bucket: str, key: str) -> _Tail:
    reply = await client.get_object(Bucket=bucket, Key=key, Range=f"bytes=-{TAIL_BYTES}")
    async with reply["Body"] as body:
        data = await body.read()
    # A server answers a suffix range longer than the object with all of it, maybe with no
    # Content-Range at all.
    match = _CONTENT_RANGE.fullmatch(str(reply.get("ContentRange", "")))
    total = int(match.group(1)) if match else len(data)
    return _Tail(data=data, start=total - len(data), total=total)


async def _read_range(client: Any, bucket: str, key: str, offset: int, length: int) -> bytes:
    end = offset + length - 1
    reply = await client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{end}")
    async with reply["Body"] as body:
        data: bytes = await body.read()
    if len(data) != length:
        raise ArchiveMismatch(f"asked for {length} bytes at {offset}, got {len(data)}")
    return data


async def _locate_directory(client: Any, bucket: str, key: str, tail: _Tail) -> _Directory:
    """The directory's place from the end record, or the ZIP64 record it points to."""
    at = _find_eocd(tail.data)
    _, disk, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail.data, at)
    if disk != 0:
        raise ArchiveMismatch("the archive claims to span several disks")
    eocd_start = tail.start + at
    locator_at = at - _ZIP64_LOCATOR.size
    if locator_at < 0 or tail.data[locator_at : locator_at + 4] != _LOCATOR_SIGNATURE:
        return _Directory(count=count, size=cd_size, offset=cd_offset, end=eocd_start)
    _, _, record_offset, _ = _ZIP64_LOCATOR.unpack_from(tail.data, locator_at)
    record = tail.slice(record_offset, _ZIP64_EOCD.size)
    if record is None:
        record = await _read_range(client, bucket, key, record_offset, _ZIP64_EOCD.size)
    fields = _ZIP64_EOCD.unpack(record)
    if fields[0] != _ZIP64_EOCD_SIGNATURE:
        raise ArchiveMismatch("the ZIP64 locator points at no ZIP64 end record")
    count, cd_size, cd_offset = fields[7], fields[8], fields[9]
    return _Directory(count=count, size=cd_size, offset=cd_offset, end=record_offset)


def _find_eocd(data: bytes) -> int:
    """The end record's position: the last signature whose comment runs to the end."""
    at = len(data) - _EOCD.size
    while (at := data.rfind(_EOCD_SIGNATURE, 0, at + 4)) >= 0:
        comment_length = _EOCD.unpack_from(data, at)[7]
        if at + _EOCD.size + comment_length == len(data):
            return at
        at -= 1
    raise ArchiveMismatch("no end of central directory record")


async def _compare_directory(
    client: Any,
    bucket: str,
    key: str,
    tail: _Tail,
    directory: _Directory,
    expected: Sequence[EntryRecord],
) -> None:
    reader = _DirectoryReader(expected, directory.offset)
    held = tail.slice(directory.offset, directory.size)
    if held is not None:
        reader.feed(held)
    else:
        end = directory.offset + directory.size - 1
        reply = await client.get_object(
            Bucket=bucket, Key=key, Range=f"bytes={directory.offset}-{end}"
        )
        async with reply["Body"] as body:
            async for chunk in body.iter_chunks(DIRECTORY_CHUNK):
                reader.feed(chunk)
    reader.finish()


class _DirectoryReader:
    """Parses central directory records as bytes arrive and checks each against `expected`."""

    def __init__(self, expected: Sequence[EntryRecord], directory_offset: int) -> None:
        self._expected = expected
        self._directory_offset = directory_offset
        self._buffer = bytearray()
        self._seen = 0
        self._last_offset = -1

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the directory."""
        self._buffer += data
        used = 0
        for record, header_offset, end in _records(self._buffer):
            self._check(record, header_offset)
            used = end
        del self._buffer[:used]

    def finish(self) -> None:
        """The directory has ended: nothing may be left over or missing."""
        if self._buffer:
            raise ArchiveMismatch("the central directory ends inside a record")
        if self._seen != len(self._expected):
            raise ArchiveMismatch(f"{self._seen} entries found, {len(self._expected)} streamed")

    def _check(self, record: EntryRecord, header_offset: int) -> None:
        if self._seen >= len(self._expected):
            raise ArchiveMismatch(f"unexpected entry {record.name!r}")
        wanted = self._expected[self._seen]
        if record != wanted:
            raise ArchiveMismatch(f"entry {self._seen}: stored {record}, streamed {wanted}")
        if not self._last_offset < header_offset < self._directory_offset:
            raise ArchiveMismatch(f"entry {record.name!r} starts out of place")
        self._last_offset = header_offset
        self._seen += 1


def _records(buffer: bytearray) -> Iterator[tuple[EntryRecord, int, int]]:
    """Each whole record in `buffer`, its local header's offset, and where the next starts."""
    at = 0
    while at + _CENTRAL.size <= len(buffer):
        fields = _CENTRAL.unpack_from(buffer, at)
        if fields[0] != _CENTRAL_SIGNATURE:
            raise ArchiveMismatch("a central directory record has a bad signature")
        flags, crc, compressed, size = fields[5], fields[9], fields[10], fields[11]
        name_length, extra_length, comment_length = fields[12], fields[13], fields[14]
        end = at + _CENTRAL.size + name_length + extra_length + comment_length
        if end > len(buffer):
            return
        raw_name = bytes(buffer[at + _CENTRAL.size : at + _CENTRAL.size + name_length])
        extra = bytes(buffer[at + _CENTRAL.size + name_length : end - comment_length])
        size, compressed, offset = _apply_zip64(extra, size, compressed, fields[18])
        name = raw_name.decode("utf-8" if flags & _UTF8_FLAG else "cp437")
        record = EntryRecord(name=name, size=size, compressed_size=compressed, crc=crc)
        yield record, offset, end
        at = end


def _apply_zip64(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset with the saturated ones taken from the ZIP64 extra field (APPNOTE 4.5.3)."""
    values = _zip64_values(extra)
    try:
        if size == 0xFFFFFFFF:
            size = next(values)
        if compressed == 0xFFFFFFFF:
            compressed = next(values)
        if offset == 0xFFFFFFFF:
            offset = next(values)
    except StopIteration:
        raise ArchiveMismatch("a ZIP64 extra field lacks a size or offset") from None
    return size, compressed, offset


def _zip64_values(extra: bytes) -> Iterator[int]:
    at = 0
    while at + _EXTRA_HEADER.size <= len(extra):
        tag, length = _EXTRA_HEADER.unpack_from(extra, at)
        body = extra[at + _EXTRA_HEADER.size : at + _EXTRA_HEADER.size + length]
        if tag == _ZIP64_EXTRA_ID:
            yield from (value for (value,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8]))
            return
        at += _EXTRA_HEADER.size + length
