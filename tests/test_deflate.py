"""DEFLATE in blocks on several threads: one valid stream, as small as one thread's."""

from __future__ import annotations

import io
import os
import random
import zipfile
import zlib

import pytest
import zipstream.ng
from isal import isal_zlib

from tasks import zipper
from tasks.deflate import BLOCK, WINDOW, ParallelDeflate, isal_level


def log_text(size: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    words = [b"GET", b"POST", b"/api/items", b"200", b"404", b"user=", b"INFO", b"request_id="]
    lines = []
    total = 0
    while total < size:
        line = b" ".join(rnd.choice(words) + b"%d" % rnd.randrange(10**5) for _ in range(10))
        lines.append(line + b"\n")
        total += len(lines[-1])
    return b"".join(lines)[:size]


def deflate(data: bytes, pieces: list[int]) -> bytes:
    """`data` through ParallelDeflate, fed in pieces of the given sizes (cycled)."""
    compressor = ParallelDeflate(1)
    out, at, index = [], 0, 0
    while at < len(data):
        size = pieces[index % len(pieces)]
        out.append(compressor.compress(data[at : at + size]))
        at, index = at + size, index + 1
    out.append(compressor.flush())
    return b"".join(out)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"short",
        log_text(BLOCK - 1),
        log_text(BLOCK),
        log_text(5 * BLOCK + 12345) + os.urandom(BLOCK) + log_text(BLOCK // 3, seed=2),
    ],
    ids=["empty", "short", "under-a-block", "one-block", "many-blocks-mixed"],
)
def test_blocks_join_into_one_stream_python_zlib_reads(data: bytes) -> None:
    compressed = deflate(data, [65536, 1, 300_000, BLOCK + 7])
    assert zlib.decompress(compressed, -zlib.MAX_WBITS) == data


def test_matches_reach_across_block_boundaries() -> None:
    # A random pattern that repeats every 2 KiB: after its first period everything is a
    # back-reference, also right after each cut, because each block is primed with the window
    # before it. Unprimed, every block would have to start with a whole period of literals.
    period = os.urandom(2 * 1024)
    data = period * (6 * BLOCK // len(period))
    compressed = deflate(data, [65536])
    assert zlib.decompress(compressed, -zlib.MAX_WBITS) == data
    unprimed = 0
    for at in range(0, len(data), BLOCK):
        alone = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
        unprimed += len(alone.compress(data[at : at + BLOCK]) + alone.flush())
    assert len(compressed) < len(data) / 20
    assert len(compressed) < unprimed - 5 * len(period)


def test_blocks_in_the_air_stay_bounded() -> None:
    compressor = ParallelDeflate(1)
    most = 0
    chunk = log_text(BLOCK)
    for _ in range(40):
        compressor.compress(chunk)
        most = max(most, len(compressor._pending))
    assert len(compressor._primer) == WINDOW
    compressor.flush()
    assert most <= compressor._ahead


def test_zipstream_uses_it_and_zipfile_checks_every_crc() -> None:
    assert zipper.deflate is not None
    assert zipstream.ng.crc32 is isal_zlib.crc32
    assert isinstance(zipstream.ng._get_compressor(zipstream.ng.ZIP_DEFLATED, 1), ParallelDeflate)
    text = log_text(3 * BLOCK + 99)
    archive = zipstream.ng.ZipStream(sized=False)
    archive.add(
        iter([text[i : i + 65536] for i in range(0, len(text), 65536)]),
        "a.log",
        compress_type=zipstream.ng.ZIP_DEFLATED,
        compress_level=1,
    )
    archive.add(iter([b"stored"]), "b.bin", compress_type=zipstream.ng.ZIP_STORED)
    with zipfile.ZipFile(io.BytesIO(b"".join(archive))) as read:
        assert read.testzip() is None
        assert read.read("a.log") == text
        assert read.getinfo("a.log").compress_size < len(text) / 1.5
        assert read.read("b.bin") == b"stored"


@pytest.mark.parametrize(
    ("asked", "used"), [(None, 2), (-1, 2), (0, 0), (1, 1), (3, 3), (6, 3), (9, 3)]
)
def test_zlib_levels_map_onto_isal_levels(asked: int | None, used: int) -> None:
    assert isal_level(asked) == used
    data = log_text(BLOCK // 2)
    compressor = zipstream.ng._get_compressor(zipstream.ng.ZIP_DEFLATED, asked)
    assert compressor.level == used
    compressed = compressor.compress(data) + compressor.flush()
    assert zlib.decompress(compressed, -zlib.MAX_WBITS) == data
