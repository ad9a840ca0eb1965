"""ArchiveStream: a ZIP formed in a worker thread, read back by Python's zipfile."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import zipfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from tasks import zipper
from tasks.verify import verify_archive
from tasks.zipper import ArchiveError, ArchiveStream, entry_name, should_compress

MIB = 1024 * 1024


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """`data` in `size`-byte chunks, as a download would arrive."""
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def collect(stream: ArchiveStream) -> bytes:
    """All of the archive's bytes."""
    out = bytearray()
    async for piece in stream:
        out += piece
    return bytes(out)


def zip_threads() -> list[threading.Thread]:
    """Worker threads of archives still alive."""
    return [t for t in threading.enumerate() if t.name.startswith("satchel-zip-")]


async def build(files: Iterable[tuple[str, bytes, str | None]]) -> tuple[ArchiveStream, bytes]:
    """An archive of `files` (candidate name, data, content type), named as the runner does."""
    stream = ArchiveStream()
    consumer = asyncio.create_task(collect(stream))
    taken: set[str] = set()
    for candidate, data, content_type in files:
        name = entry_name(candidate, taken)
        await stream.add(name, chunks_of(data), compress=should_compress(name, content_type))
    await stream.close()
    return stream, await consumer


async def test_round_trip_names_contents_and_methods() -> None:
    photo = os.urandom(300_000)
    text = b"The quick brown fox jumps over the lazy dog.\n" * 20_000
    files = [
        ("logo.png", photo, "image/png"),
        ("logo.png", photo[:1000], "image/png"),
        ("LOGO.png", b"", None),
        ("r\u00e9sum\u00e9 \u2013 \u0444\u0430\u0439\u043b.txt", text, "text/plain"),
        ("../../etc/passwd", b"root:x:0:0\n", None),
        ("e\u0301t\u00e9.csv", text[:5000], "text/csv; charset=utf-8"),
    ]
    stream, archive = await build(files)

    assert stream.bytes_out == len(archive)
    with zipfile.ZipFile(io.BytesIO(archive)) as read:
        infos = read.infolist()
        names = [info.filename for info in infos]
        assert names == [
            "logo.png",
            "logo (1).png",
            "LOGO (2).png",
            "r\u00e9sum\u00e9 \u2013 \u0444\u0430\u0439\u043b.txt",
            "passwd",
            "\u00e9t\u00e9.csv",  # NFC: e + combining acute became one character
        ]
        for info, (_, data, _) in zip(infos, files, strict=True):
            assert read.read(info) == data
        methods = [info.compress_type for info in infos]
        stored, deflated = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
        assert methods == [stored, stored, stored, deflated, deflated, deflated]
        utf8 = [bool(info.flag_bits & 0x800) for info in infos]
        assert utf8 == [False, False, False, True, False, True]
        assert infos[3].compress_size < len(text) // 10
        assert read.testzip() is None
    assert [(e.name, e.size, e.compressed_size, e.crc) for e in stream.entries] == [
        (i.filename, i.file_size, i.compress_size, i.CRC) for i in infos
    ]
    assert zip_threads() == []


@pytest.mark.parametrize("name", ["", "dir/x.txt", "..\\x.txt", "nul\0.txt"])
async def test_add_refuses_names_that_are_not_entry_names(name: str) -> None:
    stream = ArchiveStream()
    with pytest.raises(ValueError, match="entry_name"):
        await stream.add(name, chunks_of(b"x"), compress=False)
    await stream.abort()


async def test_empty_archive_is_a_valid_zip() -> None:
    stream, archive = await build([])
    with zipfile.ZipFile(io.BytesIO(archive)) as read:
        assert read.infolist() == []
    assert stream.bytes_out == len(archive) == 22


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        ("logo.png", "logo.png"),
        ("a/b/c.txt", "c.txt"),
        ("C:\\Users\\x\\report.pdf", "report.pdf"),
        ("C:report.pdf", "report.pdf"),
        ("..", "file"),
        ("../..", "file"),
        ("a/..", "file"),
        ("...", "file"),
        ("", "file"),
        ("   ", "file"),
        ("dir/", "file"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("na\x00me\x1f\x7f.txt", "name.txt"),
        ("evil\u202etxt.exe", "eviltxt.exe"),
        ("tab\there.txt", "tabhere.txt"),
        ("\ud800broken.txt", "broken.txt"),
        ("Cafe\u0301.txt", "Caf\u00e9.txt"),
        ("..hidden", "..hidden"),
        (".bashrc", ".bashrc"),
        ("  spaced name.txt ", "spaced name.txt"),
        ("\u65e5\u672c\u8a9e.pdf", "\u65e5\u672c\u8a9e.pdf"),
    ],
)
def test_entry_names_are_sanitised(candidate: str, expected: str) -> None:
    assert entry_name(candidate, set()) == expected


def test_entry_names_are_unique_case_insensitively() -> None:
    taken: set[str] = set()
    names = [
        entry_name(c, taken)
        for c in ["logo.png", "logo.png", "Logo.PNG", "logo (1).png", "x/logo.png", "a.tar.gz"]
    ]
    names.append(entry_name("a.tar.gz", taken))
    names.append(entry_name("noext", taken))
    names.append(entry_name("NOEXT", taken))
    assert names == [
        "logo.png",
        "logo (1).png",
        "Logo (2).PNG",
        "logo (1) (1).png",
        "logo (3).png",
        "a.tar.gz",
        "a (1).tar.gz",
        "noext",
        "NOEXT (1)",
    ]
    assert "logo (2).png" in taken


def test_many_duplicates_stay_fast_and_unique() -> None:
    taken: set[str] = set()
    names = [entry_name("image.jpg", taken) for _ in range(20_000)]
    assert len(set(names)) == 20_000
    assert names[:3] == ["image.jpg", "image (1).jpg", "image (2).jpg"]
    assert names[-1] == "image (19999).jpg"


def test_long_names_keep_their_extension_within_255_bytes() -> None:
    taken: set[str] = set()
    first = entry_name("\u00e9" * 200 + ".jpeg", taken)
    second = entry_name("\u00e9" * 200 + ".jpeg", taken)
    for name, ending in ((first, "\u00e9.jpeg"), (second, "\u00e9 (1).jpeg")):
        assert len(name.encode()) <= 255
        assert name.endswith(ending)  # cut on a character boundary, extension kept
    assert entry_name("x" * 300, set()) == "x" * 255
    assert len(entry_name("a." + "b" * 300, set()).encode()) == 255


@pytest.mark.parametrize(
    ("name", "content_type", "compress"),
    [
        ("photo.jpg", None, False),
        ("photo", "image/jpeg", False),
        ("photo.PNG", "application/octet-stream", False),
        ("drawing.svg", "image/svg+xml", True),
        ("backup.tar.gz", None, False),
        ("bundle.zip", None, False),
        ("doc.pdf", None, False),
        ("x", "application/pdf", False),
        ("font.woff2", None, False),
        ("x", "font/woff2", False),
        ("song.mp3", None, False),
        ("x", "audio/mpeg", False),
        ("x", "video/mp4; codecs=avc1", False),
        ("take.wav", "audio/wav", True),
        ("sheet.xlsx", None, False),
        ("x", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", False),
        ("index.html", "text/html", True),
        ("data.json", "application/json", True),
        ("data.csv", None, True),
        ("noextension", None, True),
        ("blob", "application/octet-stream", True),
    ],
)
def test_should_compress(name: str, content_type: str | None, compress: bool) -> None:
    assert should_compress(name, content_type) is compress


async def counting_source(total: int, counter: list[int], chunk: bytes) -> AsyncIterator[bytes]:
    """`total` bytes of `chunk`s, counting in `counter[0]` what was handed over."""
    for _ in range(total // len(chunk)):
        counter[0] += len(chunk)
        yield chunk


async def test_slow_consumer_holds_memory_bounded() -> None:
    chunk = os.urandom(64 * 1024)
    produced = [0]
    consumed = 0
    most_ahead = 0
    stream = ArchiveStream()

    async def slow_consumer() -> None:
        nonlocal consumed, most_ahead
        async for piece in stream:
            consumed += len(piece)
            most_ahead = max(most_ahead, produced[0] - consumed)
            await asyncio.sleep(0.002)

    consumer = asyncio.create_task(slow_consumer())
    await stream.add("big.bin", counting_source(48 * MIB, produced, chunk), compress=False)
    await stream.close()
    await consumer
    # Input queue, output queue and the piece being joined: a few MiB, not the 48 MiB entry.
    bound = zipper.IN_SLOTS * len(chunk) + (zipper.OUT_SLOTS + 2) * zipper.OUT_PIECE
    assert 0 < most_ahead <= bound
    assert consumed == stream.bytes_out > 48 * MIB


async def test_stalled_consumer_stalls_the_source_then_abort_ends_the_thread() -> None:
    produced = [0]
    stream = ArchiveStream()
    adding = asyncio.create_task(
        stream.add("x.bin", counting_source(1 << 40, produced, bytes(64 * 1024)), compress=False)
    )
    await asyncio.sleep(0.5)
    stalled_at = produced[0]
    await asyncio.sleep(0.2)
    assert produced[0] == stalled_at  # nobody reads: the source is no longer pulled
    assert stalled_at <= zipper.IN_SLOTS * 64 * 1024 + (zipper.OUT_SLOTS + 2) * zipper.OUT_PIECE
    assert len(zip_threads()) == 1

    await stream.abort()
    assert zip_threads() == []
    with pytest.raises(ArchiveError):
        await adding
    with pytest.raises(ArchiveError):
        await collect(stream)


async def test_abort_while_worker_waits_for_input() -> None:
    never = asyncio.Event()

    async def hanging_source() -> AsyncIterator[bytes]:
        yield b"first"
        await never.wait()
        yield b"never"

    stream = ArchiveStream()
    consumer = asyncio.create_task(collect(stream))
    adding = asyncio.create_task(stream.add("x.txt", hanging_source(), compress=True))
    await asyncio.sleep(0.1)
    adding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await adding
    await stream.abort()
    await stream.abort()  # again: harmless
    assert zip_threads() == []
    with pytest.raises(ArchiveError):
        await consumer
    with pytest.raises(ArchiveError):
        await stream.add("y.txt", chunks_of(b"y"), compress=False)


async def test_failing_source_fails_the_archive() -> None:
    async def failing_source() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ConnectionResetError("origin went away")

    stream = ArchiveStream()
    consumer = asyncio.create_task(collect(stream))
    with pytest.raises(ConnectionResetError):
        await stream.add("x.txt", failing_source(), compress=False)
    with pytest.raises(ArchiveError):
        await consumer
    await stream.abort()
    assert zip_threads() == []


async def test_abort_before_any_use_and_after_close() -> None:
    unused = ArchiveStream()
    await unused.abort()
    with pytest.raises(ArchiveError):
        await collect(unused)
    assert zip_threads() == []
    stream, _ = await build([("a.txt", b"a", None)])
    await stream.abort()
    assert zip_threads() == []


class FileBody:
    """A byte range of a local file, read the way aiobotocore's streaming body is."""

    def __init__(self, path: Path, start: int, end: int) -> None:
        self.file = path.open("rb")
        self.file.seek(start)
        self.left = end - start + 1

    async def __aenter__(self) -> FileBody:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.file.close()

    async def read(self) -> bytes:
        """All of the range."""
        return self.file.read(self.left)

    async def iter_chunks(self, size: int) -> AsyncIterator[bytes]:
        """The range in chunks."""
        while self.left > 0 and (chunk := self.file.read(min(size, self.left))):
            self.left -= len(chunk)
            yield chunk


class FileClient:
    """Just enough of an S3 client to serve ranged GETs of one local file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ranges: list[str] = []

    async def get_object(self, *, Bucket: str, Key: str, Range: str) -> dict[str, Any]:
        """A ranged GET: `bytes=a-b` or `bytes=-n`."""
        self.ranges.append(Range)
        total = self.path.stat().st_size
        first, last = Range.removeprefix("bytes=").split("-")
        start, end = (total - int(last), total - 1) if not first else (int(first), int(last))
        body = FileBody(self.path, max(start, 0), end)
        return {"Body": body, "ContentRange": f"bytes {max(start, 0)}-{end}/{total}"}


class SparseSink:
    """Writes an archive to a file, seeking over all-zero pieces so they take no disk."""

    def __init__(self, path: Path, zeros: bytes) -> None:
        self.file = path.open("wb")
        self.zeros = zeros

    def write(self, piece: bytes) -> None:
        """Write or skip one piece."""
        if piece is self.zeros or piece == self.zeros:
            self.file.seek(len(piece), io.SEEK_CUR)
        else:
            self.file.write(piece)

    def close(self) -> None:
        """Fix the length (a trailing seek writes nothing) and close."""
        self.file.truncate()
        self.file.close()


@pytest.mark.slow
async def test_zip64_entry_and_archive_over_4_gib(tmp_path: Path) -> None:
    zeros = bytes(MIB)
    size = 4100 * MIB  # past 4 GiB, so ZIP64 sizes, offsets and end records are all needed

    async def zero_source() -> AsyncIterator[bytes]:
        for _ in range(size // MIB):
            yield zeros

    path = tmp_path / "big.zip"
    sink = SparseSink(path, zeros)
    stream = ArchiveStream()

    async def drain() -> None:
        async for piece in stream:
            sink.write(piece)

    consumer = asyncio.create_task(drain())
    big = await stream.add("zeros.bin", zero_source(), compress=False)
    after = await stream.add("after.txt", chunks_of(b"past the 4 GiB mark\n"), compress=True)
    await stream.close()
    await consumer
    sink.close()

    assert path.stat().st_size == stream.bytes_out > 4 * 1024 * MIB
    with zipfile.ZipFile(path) as read:
        first, second = read.infolist()
        assert (first.filename, first.file_size, first.compress_size) == ("zeros.bin", size, size)
        assert big.crc == first.CRC
        assert second.header_offset > 0xFFFFFFFF
        assert read.read("after.txt") == b"past the 4 GiB mark\n"
        assert after.crc == second.CRC
        with read.open("zeros.bin") as member:  # zipfile checks the CRC at the end
            while block := member.read(16 * MIB):
                assert block.count(0) == len(block)

    # The same directory through verify_archive: ZIP64 sizes and offsets in the extra fields.
    client = FileClient(path)
    await verify_archive(client, "b", "k", expected=[big, after], size=stream.bytes_out)
    assert client.ranges == ["bytes=-65633"]  # the tail held end records and directory alike


@pytest.mark.slow
async def test_zip64_more_than_65535_entries() -> None:
    count = 65_537
    stream = ArchiveStream()
    consumer = asyncio.create_task(collect(stream))
    for i in range(count):
        await stream.add(f"{i:05d}.txt", chunks_of(b"%d\n" % i), compress=i % 2 == 0)
    await stream.close()
    archive = await consumer

    with zipfile.ZipFile(io.BytesIO(archive)) as read:
        infos = read.infolist()
        assert len(infos) == count
        for i in (0, 1, 65_534, 65_535, 65_536):
            assert read.read(f"{i:05d}.txt") == b"%d\n" % i
        assert read.testzip() is None
    assert len(stream.entries) == count


async def test_a_reused_buffer_is_copied_and_read_only_views_pass_unchanged() -> None:
    """A caller may refill its own bytearray after handing it on; frozen views are not copied."""
    pieces = [os.urandom(100_000) for _ in range(6)]
    frozen = memoryview(bytearray(b"".join(pieces))).toreadonly()

    async def refilled() -> AsyncIterator[bytearray]:
        buffer = bytearray(100_000)
        for piece in pieces:
            buffer[:] = piece
            yield buffer

    async def views() -> AsyncIterator[memoryview]:
        for at in range(0, len(frozen), 150_000):
            yield frozen[at : at + 150_000]

    sent: list[object] = []
    stream = ArchiveStream()
    send = stream._send

    async def recording(item: object) -> None:
        sent.append(item)
        await send(item)

    stream._send = recording  # type: ignore[method-assign]
    consumer = asyncio.create_task(collect(stream))
    await stream.add("a.bin", refilled(), compress=False)
    await stream.add("b.bin", views(), compress=False)
    await stream.close()
    with zipfile.ZipFile(io.BytesIO(await consumer)) as read:
        assert read.read("a.bin") == b"".join(pieces)
        assert read.read("b.bin") == bytes(frozen)
    data = [item for item in sent if isinstance(item, bytes | memoryview)]
    assert all(type(item) is bytes for item in data[:6])
    assert all(item.obj is frozen.obj for item in data[6:])  # type: ignore[union-attr]
