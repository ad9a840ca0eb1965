"""One multipart part's bytes in a reusable buffer, sent by aiohttp straight from that buffer.

A `bytes` body costs botocore and aiohttp two more copies of every part: botocore wraps it in a
`BytesIO`, aiohttp's payload for that takes the buffer (which unshares it: a copy) and then
reads it back in 256 KiB pieces (another). A fresh 8 MiB object per part also keeps the
allocator busy, and where its peaks land depends on timing. A `PartBody` is a view of a buffer
the upload owns and reuses: botocore sees a file-like body (`read`, `seek`, `tell`, `len`), and
the payload registered for it here hands aiohttp slices of the view, which the socket reads
from directly.
"""

from __future__ import annotations

import io
from typing import Any

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload, register_payload

# Bytes handed to the connection at a time; each write lets the loop run between slices.
SEND_SLICE = 1024 * 1024


class PartBody:
    """The first `size` bytes of `buffer`, as a file-like request body."""

    def __init__(self, buffer: bytearray, size: int) -> None:
        self.buffer = buffer
        self.view = memoryview(buffer)[:size]
        self._position = 0

    def __len__(self) -> int:
        """The part's size."""
        return self.view.nbytes

    def read(self, amount: int = -1) -> bytes:
        """Bytes from the current position (botocore reads a body only when it must hash it)."""
        end = len(self) if amount is None or amount < 0 else min(len(self), self._position + amount)
        data = self.view[self._position : end].tobytes()
        self._position = max(self._position, end)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position, as a file's `seek` (botocore rewinds a body before a retry)."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        """The current position."""
        return self._position


class PartPayload(Payload):
    """aiohttp's payload for a `PartBody`: the view written in slices, nothing copied."""

    _value: PartBody

    def __init__(self, value: PartBody, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("content_type", "application/octet-stream")
        super().__init__(value, *args, **kwargs)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The body as text (aiohttp's interface; never used for an upload)."""
        return self._value.view.tobytes().decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        """Write the whole part."""
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        """Write the part, or its first `content_length` bytes."""
        view = self._value.view
        end = len(view) if content_length is None else min(len(view), content_length)
        for start in range(0, end, SEND_SLICE):
            await writer.write(view[start : min(end, start + SEND_SLICE)])


register_payload(PartPayload, PartBody)
