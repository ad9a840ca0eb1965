"""One ZIP archive formed by zipstream-ng in a worker thread, fed from and drained to the loop.

The event loop hands entry data to the worker through a small queue and takes the archive bytes
back through another; both are bounded, so a slow source stalls the worker and a slow consumer
stalls the sources, and memory stays a few chunks deep whatever the archive's size.

    stream = ArchiveStream()
    # one task: for each file, `record = await stream.add(name, chunks, compress=...)`,
    #           then `await stream.close()`
    # another:  `async for piece in stream: await upload.write(piece)`
    # on any failure or cancellation: `await stream.abort()`
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import re
import struct
import threading
import unicodedata
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from zipstream import ZIP_DEFLATED, ZIP_STORED, ZipStream

from tasks import deflate

# DEFLATE entries are compressed in blocks on every core (see tasks/deflate.py).
deflate.install()

# Level 1: compressible content is mostly text, where level 1 already saves most of what level 6
# would, at about three times the speed; the archive must keep pace with the network.
DEFLATE_LEVEL = 1
# Chunks waiting for the worker; with the sources' chunk size (the fetcher's 1 MiB) this bounds
# the input side to 4 MiB.
IN_SLOTS = 4
# Formed pieces waiting for the consumer.
OUT_SLOTS = 8
# The compressor emits many small pieces; joining them up to this size keeps the loop's
# per-piece work (wake-ups, upload buffer appends) low without holding much.
OUT_PIECE = 256 * 1024
# zipstream-ng ends an entry of unknown size with a ZIP64 data descriptor: signature, CRC-32,
# compressed size, size (APPNOTE 4.3.9).
_DESCRIPTOR = struct.Struct("<4sLQQ")
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_thread_numbers = itertools.count(1)
# Entry data and formed archive bytes: bytes, or read-only views that pass through unchanged.
Piece = bytes | memoryview


@dataclass(frozen=True)
class EntryRecord:
    """What was streamed for one entry, taken from its data descriptor."""

    name: str
    size: int
    compressed_size: int
    crc: int


class ArchiveError(Exception):
    """The archive cannot be completed: it was aborted, or forming it failed."""


@dataclass(frozen=True)
class _Entry:
    name: str
    compress: bool


class _Marker:
    """A control item on the input queue."""


_END_ENTRY, _CLOSE, _STOP = _Marker(), _Marker(), _Marker()


class _Stopped(Exception):
    """The worker was told to stop."""


class _Signal:
    """Wakes a loop task that waits on the worker, crossing threads only while it waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()
        self._armed = False

    async def until(self, ready: Callable[[], bool]) -> None:
        """Wait until `ready()` holds."""
        while not ready():
            self._event.clear()
            self._armed = True
            try:
                # Re-check once armed: a change made before the worker saw the flag wakes no one.
                if not ready():
                    await self._event.wait()
            finally:
                self._armed = False

    def notify(self) -> None:
        """From the worker: something changed."""
        if self._armed:
            _call_soon(self._loop, self._event.set)

    def wake(self) -> None:
        """From the loop: something changed."""
        self._event.set()


def _frozen(chunk: object) -> bool:
    return type(chunk) is bytes or (isinstance(chunk, memoryview) and chunk.readonly)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    # A loop closed under a still-running worker has no one left to tell.
    if not loop.is_closed():
        loop.call_soon_threadsafe(callback, *args)


class ArchiveStream:
    """A ZIP archive formed entry by entry in its own thread; iterate it for the bytes."""

    def __init__(self) -> None:
        """Create inside the event loop; the worker thread starts with the first use."""
        self._loop = asyncio.get_running_loop()
        self._writable = _Signal(self._loop)
        self._readable = _Signal(self._loop)
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._record: asyncio.Future[EntryRecord] | None = None
        self.bytes_out = 0
        self.entries: list[EntryRecord] = []
        self._in: queue.Queue[object] = queue.Queue()
        self._out: queue.Queue[Piece] = queue.Queue(maxsize=OUT_SLOTS)
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._closed = False
        self._adding = False
        self._thread: threading.Thread | None = None
        self._pending: list[Piece] = []
        self._pending_size = 0

    # --- the event loop's side ---------------------------------------------------------

    async def add(self, name: str, chunks: AsyncIterable[Piece], *, compress: bool) -> EntryRecord:
        """Stream one entry; return its record once the worker has formed all of it.

        Chunks are passed on as they are when they cannot change (bytes, read-only views, whose
        buffer the caller must leave alone); anything else is copied first.
        """
        if not name or any(c in name for c in "/\\\0"):
            raise ValueError(f"{name!r} is no entry name: make one with entry_name()")
        self._start()
        self._check_open()
        if self._adding:
            raise RuntimeError("entries are added one at a time")
        self._adding = True
        formed: asyncio.Future[EntryRecord] = self._loop.create_future()
        self._record = formed
        try:
            await self._send(_Entry(name, compress))
            async for chunk in chunks:
                if chunk:
                    await self._send(chunk if _frozen(chunk) else bytes(chunk))
            await self._send(_END_ENTRY)
            record = await formed
        except BaseException as exc:
            # A half-sent entry cannot be completed: the archive is lost.
            self._drop_record()
            self._halt(exc)
            raise
        finally:
            self._adding = False
        self.entries.append(record)
        return record

    async def close(self) -> None:
        """No more entries: the worker writes the central directory, then the stream ends."""
        self._start()
        self._check_open()
        if self._adding:
            raise RuntimeError("an entry is still being added")
        await self._send(_CLOSE)
        self._closed = True

    def __aiter__(self) -> AsyncIterator[Piece]:
        """The archive's bytes as the worker forms them (one consumer)."""
        return self

    async def __anext__(self) -> Piece:
        """The next formed piece of the archive."""
        self._start()
        out = self._out
        await self._readable.until(lambda: not out.empty() or self._exited.done())
        try:
            piece = out.get_nowait()
        except queue.Empty:
            self._finish()
            raise StopAsyncIteration from None
        self.bytes_out += len(piece)
        return piece

    async def abort(self) -> None:
        """Stop the worker and wait for its thread to end; safe to call at any time, repeatedly."""
        self._halt(ArchiveError("the archive was aborted"))
        if self._thread is not None:
            await asyncio.shield(self._exited)
            self._thread.join()

    def _start(self) -> None:
        if self._thread is not None or self._exited.done():
            return
        if self._failure is not None:
            self._exited.set_result(None)  # aborted before any use: no thread to start
            return
        # A thread of its own, not the loop's default executor: it lives as long as the
        # archive, and would otherwise starve the executor's other users (DNS resolution).
        name = f"satchel-zip-{next(_thread_numbers)}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _check_open(self) -> None:
        if self._failure is not None:
            raise ArchiveError("the archive can take no more entries") from self._failure
        if self._closed:
            raise RuntimeError("the archive is closed")

    async def _send(self, item: object) -> None:
        inbox = self._in
        await self._writable.until(lambda: inbox.qsize() < IN_SLOTS or self._failure is not None)
        if self._failure is not None:
            raise ArchiveError("the archive can take no more entries") from self._failure
        inbox.put_nowait(item)

    def _halt(self, error: BaseException) -> None:
        """Tell the worker to stop, unblock it, and fail whoever waits on it."""
        if self._failure is None:
            self._failure = error
        self._stop.set()
        self._in.put_nowait(_STOP)
        # A worker blocked on a full output queue gets one slot, then sees the stop flag.
        while not self._out.empty():
            self._out.get_nowait()
        self._fail_record(self._failure)
        self._writable.wake()
        self._readable.wake()

    def _finish(self) -> None:
        """The worker has ended and everything it formed was taken."""
        if self._thread is not None:
            self._thread.join()
        if self._failure is not None:
            raise ArchiveError("the archive is incomplete") from self._failure

    def _fail_record(self, error: BaseException) -> None:
        record = self._record
        if record is not None and not record.done():
            failure = error if isinstance(error, ArchiveError) else ArchiveError(str(error))
            record.set_exception(failure)

    def _drop_record(self) -> None:
        """Forget the pending record: add() is failing with its own error, not this one."""
        record, self._record = self._record, None
        if record is not None and record.done() and not record.cancelled():
            record.exception()  # retrieved, so asyncio does not log it as lost

    def _entry_formed(self, record: EntryRecord) -> None:
        if self._record is not None and not self._record.done():
            self._record.set_result(record)

    def _worker_exited(self, error: BaseException | None) -> None:
        if error is not None and self._failure is None:
            self._failure = error
            self._fail_record(ArchiveError(f"forming the archive failed: {error!r}"))
        elif error is None and self._failure is None and not self._closed:
            self._failure = ArchiveError("the worker ended before the archive was closed")
        self._exited.set_result(None)
        self._writable.wake()
        self._readable.wake()

    # --- the worker thread's side ------------------------------------------------------

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._form()
        except _Stopped:
            pass
        except BaseException as exc:  # reported to the loop, which raises it to the caller
            error = exc
        _call_soon(self._loop, self._worker_exited, error)

    def _form(self) -> None:
        """Write entries as they come, then the central directory."""
        # Unsized: entries of unknown size get ZIP64 local headers and data descriptors, so
        # any entry may exceed 4 GiB; `sized=True` would read each iterable into memory.
        archive = ZipStream(sized=False)
        while (command := self._take()) is not _CLOSE:
            if not isinstance(command, _Entry):
                raise RuntimeError(f"expected an entry, got {command!r}")
            options = _compression(command.compress)
            archive.add(self._entry_data(), command.name, **options)
            tail = self._emit_entry(archive.file())
            _call_soon(self._loop, self._entry_formed, _read_descriptor(command.name, tail))
        for piece in archive.footer():
            self._emit(piece)
        self._flush()

    def _take(self) -> object:
        if self._in.empty():
            # Hand over what is formed before waiting, so the consumer never waits on it.
            self._flush()
        item = self._in.get()
        self._writable.notify()
        if item is _STOP or self._stop.is_set():
            raise _Stopped
        return item

    def _entry_data(self) -> Iterator[Piece]:
        while (item := self._take()) is not _END_ENTRY:
            if not isinstance(item, bytes | memoryview):
                raise RuntimeError(f"expected entry data, got {item!r}")
            yield item

    def _emit_entry(self, pieces: Iterable[Piece]) -> bytes:
        """Pass an entry's pieces on; return its last bytes (the data descriptor)."""
        tail = b""
        for piece in pieces:
            if piece:
                self._emit(piece)
                tail = (tail + piece[-_DESCRIPTOR.size :])[-_DESCRIPTOR.size :]
        return tail

    def _emit(self, piece: Piece) -> None:
        self._pending.append(piece)
        self._pending_size += len(piece)
        if self._pending_size >= OUT_PIECE:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        piece = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending, self._pending_size = [], 0
        self._out.put(piece)
        self._readable.notify()
        if self._stop.is_set():
            raise _Stopped


def _compression(compress: bool) -> dict[str, int]:
    if compress:
        return {"compress_type": ZIP_DEFLATED, "compress_level": DEFLATE_LEVEL}
    return {"compress_type": ZIP_STORED}


def _read_descriptor(name: str, descriptor: bytes) -> EntryRecord:
    """The entry's record from the data descriptor zipstream-ng streamed after its data."""
    if len(descriptor) != _DESCRIPTOR.size:
        raise RuntimeError(f"entry {name!r} ended without a ZIP64 data descriptor")
    signature, crc, compressed_size, size = _DESCRIPTOR.unpack(descriptor)
    if signature != _DESCRIPTOR_SIGNATURE:
        raise RuntimeError(f"entry {name!r} ended without a ZIP64 data descriptor")
    return EntryRecord(name=name, size=size, compressed_size=compressed_size, crc=crc)


# --- entry names --------------------------------------------------------------------------

MAX_NAME_BYTES = 255
# Longer "extensions" are more likely part of the name than a type, and must not eat the stem.
MAX_EXTENSION_BYTES = 32
_DRIVE = re.compile(r"^[A-Za-z]:")
_DOUBLE_EXTENSION = re.compile(r"(\.tar\.[A-Za-z0-9]+)$", re.IGNORECASE)
# Control (Cc), format (Cf: bidi overrides that disguise an extension) and lone surrogates (Cs:
# not encodable as UTF-8).
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})


def entry_name(candidate: str, taken: set[str]) -> str:
    """A safe entry name for `candidate`, unique against `taken` (casefolded names); adds it."""
    stem, extension = _split(_clean(candidate))
    if _free(_fit(stem, "", extension), taken):
        return _take_name(_fit(stem, "", extension), taken)
    # Galloping, then bisecting between a taken and a free number: O(log n) probes even for
    # thousands of files of one name (every `.../image.jpg`), and the smallest number when
    # the taken ones are contiguous, as they are when this function numbered them.
    taken_n, free_n = 0, 1
    while not _free(_fit(stem, f" ({free_n})", extension), taken):
        taken_n, free_n = free_n, free_n * 2
    while free_n - taken_n > 1:
        middle = (taken_n + free_n) // 2
        if _free(_fit(stem, f" ({middle})", extension), taken):
            free_n = middle
        else:
            taken_n = middle
    return _take_name(_fit(stem, f" ({free_n})", extension), taken)


def _clean(candidate: str) -> str:
    name = unicodedata.normalize("NFC", candidate)
    name = re.split(r"[/\\]", name)[-1]
    name = _DRIVE.sub("", name)
    name = "".join(c for c in name if unicodedata.category(c) not in _DROPPED_CATEGORIES)
    name = unicodedata.normalize("NFC", name).strip()
    # ".", ".." and other all-dot names are directory references, not files.
    return "" if name.strip(".") == "" else name


def _split(name: str) -> tuple[str, str]:
    """Stem and extension (".png", ".tar.gz"); an empty name becomes "file"."""
    if not name:
        return "file", ""
    match = _DOUBLE_EXTENSION.search(name) or re.search(r"(\.[^.]+)$", name)
    if match is None or match.start() == 0:
        return name, ""
    extension = match.group(1)
    if len(extension.encode()) > MAX_EXTENSION_BYTES:
        return name, ""
    return name[: match.start()], extension


def _fit(stem: str, suffix: str, extension: str) -> str:
    """`stem + suffix + extension` within MAX_NAME_BYTES, shortening the stem."""
    room = MAX_NAME_BYTES - len(suffix.encode()) - len(extension.encode())
    shortened = stem.encode()[:room].decode(errors="ignore")
    return shortened + suffix + extension


def _free(name: str, taken: set[str]) -> bool:
    return name.casefold() not in taken


def _take_name(name: str, taken: set[str]) -> str:
    taken.add(name.casefold())
    return name


# --- compression --------------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Formats that are compressed already: DEFLATE would spend CPU to gain nothing.
_COMPRESSED_EXTENSIONS = _words(
    """
    jpg jpeg jpe jfif png gif webp avif heic heif jxl jp2 tif tiff
    zip gz tgz bz2 tbz2 xz txz 7z rar zst zstd lz lz4 lzma br cab jar war apk ipa aab dmg
    docx xlsx pptx odt ods odp epub xpi whl nupkg
    mp3 aac m4a ogg oga opus flac wma
    mp4 m4v mkv webm mov avi wmv flv mpg mpeg 3gp ts
    pdf woff woff2
    """
)
_COMPRESSED_TYPES = _words(
    """
    image/jpeg image/png image/gif image/webp image/avif image/heic image/heif image/jxl
    application/zip application/gzip application/x-gzip application/x-bzip2 application/x-xz
    application/x-7z-compressed application/vnd.rar application/x-rar-compressed
    application/zstd application/x-lzip application/java-archive application/epub+zip
    application/pdf font/woff font/woff2 application/font-woff
    """
)
# Uncompressed audio: the one audio/* that DEFLATE still shrinks.
_UNCOMPRESSED_MEDIA = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/aiff"})


def should_compress(name: str, content_type: str | None) -> bool:
    """False (STORED) for already-compressed content by extension or type, else True."""
    extension = name.rpartition(".")[2].lower() if "." in name else ""
    if extension in _COMPRESSED_EXTENSIONS:
        return False
    media = (content_type or "").split(";")[0].strip().lower()
    if media in _COMPRESSED_TYPES or media.startswith("application/vnd.openxmlformats"):
        return False
    media_file = media.startswith(("audio/", "video/")) and media not in _UNCOMPRESSED_MEDIA
    return not media_file
