"""The archive pipeline: throughput against an upload-only baseline, peak memory, responsiveness.

`python -m bench.archive [--rounds 3 ...]` runs, on 127.0.0.1 only:

1. Throughput. A loopback origin (`python -m bench.origin`, its own process) serves 1 GiB in
   16 files, random (stored) and log text (deflated). `satchel serve` with JOB_CONCURRENCY=1
   archives them into moto; MiB/s = archive bytes / the upload's create -> complete, as the
   worker logs it (the whole run, processing -> task.archived, is shown too). The baseline
   uploads the same number of bytes from this process with the same aiobotocore client
   settings, request shape, part size and parts in flight, from one pre-generated part
   (reused), into the same moto. After a full-size warm-up of each, rounds alternate which goes
   first; the ratio is taken per round and its median reported (goal >= 0.9). 1b repeats this
   into `bench.s3sink`, which drops the bytes, to show the pipeline's own cost without moto's.
2. Peak RSS (VmHWM) of the archive worker of a freshly started `satchel serve` (the process that
   forms the archives) for a 256 MiB and a 4 GiB archive of incompressible files, twice each,
   and the difference of the highest peaks (goal <= 16 MiB).
   These go to `bench.s3sink`: moto needs about 4x a completed object in RAM (17 GiB for 4 GiB)
   and about 10 s per GiB to complete it, past Satchel's 60 s S3 read timeout.
3. Responsiveness while JOB_CONCURRENCY=4 archives run: GET /health every 20 ms (its latency is
   the event-loop lag seen from outside; goal p99 < 20 ms) and GET /tasks?limit=50 at 20 req/s
   (goal: p99 <= 2x its idle p99), both from fixed-rate clients, first idle, then loaded; a
   bare Tornado hello-world (`bench.hello`) is probed alongside, as the machine's own floor. 3c
   repeats it with the archives paced to --load-rate MB/s in all (a network's speed), 3b with
   ARCHIVE_WORKER=inline, the archives on the API's own event loop (information, not a goal).

moto, the sink and the origin stand in for other machines: they run at the archive worker's
CPU priority (--infra-nice), so that neither side is favoured and the API goes first.

Every row says who used the CPU meanwhile, including how long Satchel's event-loop thread sat
runnable without a CPU (on a shared machine that is latency no change to Satchel removes).

PostgreSQL and S3 are a local throwaway cluster and moto, unless DATABASE_URL is set (then a
schema of its own, satchel_bench_archive, dropped at the end) and S3_ENDPOINT_URL names a
loopback S3 (a bucket of its own, satchel-bench). Every object it makes is deleted again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuid_module
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from bench import (
    LOCALHOST,
    Server,
    _machine_busy,
    _own_cpu,
    _postgres_cpu,
    _stat,
    running,
    satchel_command,
    services,
    tail,
    with_search_path,
)
from bench.api import machine
from server.config import Settings
from storage.migrate import migrate
from storage.multipart import CHECKSUM, ensure_bucket, part_checksum, part_size_for
from storage.s3 import ObjectStore

MIB = 1024 * 1024
GIB = 1024 * MIB
SCHEMA = "satchel_bench_archive"  # where a shared DATABASE_URL gets its tables
BUCKET = "satchel-bench"
REGION = "us-east-1"
# The server's limits: the part size follows from MAX_ARCHIVE_BYTES (8 MiB up to ~78 GiB).
MAX_ARCHIVE_BYTES = 8 * GIB
MAX_FILE_BYTES = 2 * GIB
PARTS_IN_FLIGHT = 3  # tasks.runner.RunnerConfig's default
# Goals (issue 3).
GOAL_RATIO = 0.9
GOAL_RSS_DIFF_MIB = 16.0
GOAL_LAG_P99_MS = 20.0
GOAL_TASKS_P99_FACTOR = 2.0
# Finished tasks seeded before anything else: GET /tasks?limit=50 always shows these 50 first.
SEEDED_TASKS = 200
TASKS_PATH = "/tasks?limit=50"
HEALTH_PATH = "/health"
POLL = 0.05  # seconds between looks at a task's status (in PostgreSQL, not through Satchel)
RSS_SAMPLE = 0.05
# A started worker process imports and opens its pools in about a second; idle RSS comes after.
WORKER_SETTLE = 2.0
TASK_TIMEOUT = 600.0

RANDOM_NAMES = ("photo.jpg", "clip.mp4", "bundle.zip", "scan.png", "manual.pdf")
TEXT_NAMES = ("server.log", "export.csv", "notes.txt")


# --- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OriginFile:
    """One file of the origin: what bench.origin generates for its path."""

    kind: str  # "random" or "text"
    seed: int
    size: int
    name: str

    def url(self, port: int) -> str:
        """Its URL on the origin."""
        return f"http://{LOCALHOST}:{port}/{self.kind}/{self.seed}/{self.size}/{self.name}"


def mixed_files(total: int, count: int, *, seed: int, text_every: int = 4) -> list[OriginFile]:
    """`count` files of `total` bytes together, every `text_every`-th text, sizes 1x to 3x."""
    weights = [1 + (i * 7) % 5 * 0.5 for i in range(count)]
    sizes = [int(total * w / sum(weights)) for w in weights]
    sizes[-1] += total - sum(sizes)
    files = []
    for i, size in enumerate(sizes):
        text = text_every > 0 and i % text_every == text_every - 1
        names = TEXT_NAMES if text else RANDOM_NAMES
        stem, ext = names[i % len(names)].rsplit(".", 1)
        kind = "text" if text else "random"
        files.append(OriginFile(kind, seed * 1000 + i, size, f"{stem}-{i:02d}.{ext}"))
    return files


def random_files(total: int, count: int, *, seed: int) -> list[OriginFile]:
    """`count` incompressible files of equal size (stored in the ZIP)."""
    size = total // count
    return [OriginFile("random", seed * 1000 + i, size, f"clip-{i:02d}.mp4") for i in range(count)]


def describe(files: Sequence[OriginFile]) -> str:
    """`16 files, 1024.0 MiB: 12 random 768.0 MiB, 4 text 256.0 MiB`."""
    parts = []
    for kind in ("random", "text"):
        mine = [f for f in files if f.kind == kind]
        if mine:
            parts.append(f"{len(mine)} {kind} {sum(f.size for f in mine) / MIB:.1f} MiB")
    total = sum(f.size for f in files)
    return f"{len(files)} files, {total / MIB:.1f} MiB: {', '.join(parts)}"


# --- a small keep-alive HTTP client -----------------------------------------------------------


class Http:
    """HTTP/1.1 to 127.0.0.1:port: a pool of keep-alive connections, or one per request.

    The fixed-rate probes keep their connections busy; the control requests (creating tasks)
    come seconds apart, and use a connection each, so that none meets a stale pooled one.
    """

    def __init__(self, port: int, *, keep_alive: bool = False) -> None:
        self.port = port
        self.keep_alive = keep_alive
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(
        self, method: str, path: str, body: Any = None, *, time_limit: float = 30.0
    ) -> tuple[int, bytes]:
        """Status and body of one request; a JSON body is sent as JSON."""
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {LOCALHOST}:{self.port}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        if not self.keep_alive:
            head += "Connection: close\r\n"
        head += f"Content-Length: {len(data)}\r\n\r\n"
        conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = await asyncio.open_connection(LOCALHOST, self.port)
        reader, writer = conn
        try:
            async with asyncio.timeout(time_limit):
                writer.write(head.encode() + data)
                response = await reader.readuntil(b"\r\n\r\n")
                status = int(response[9:12])
                content = await reader.readexactly(_content_length(response))
        except BaseException:
            writer.close()
            raise
        if not self.keep_alive or b"\r\nconnection: close" in response.lower():
            writer.close()
        else:
            self._idle.append(conn)
        return status, content

    async def json(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON of a 2xx answer; anything else raises."""
        status, content = await self.request(method, path, body)
        if not 200 <= status < 300:
            raise RuntimeError(f"{method} {path} answered {status}: {content[:500]!r}")
        return json.loads(content)

    def close(self) -> None:
        """Close the idle connections."""
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


# --- CPU accounting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cpu:
    """Cores used during a measurement, by whom (1.0 = one core busy all the time).

    `loop_run` and `loop_wait` are the shares of wall time Satchel's main thread (the event
    loop) spent on a CPU and runnable but waiting for one (/proc/PID/task/PID/schedstat): on a
    shared machine the second is latency no code change in Satchel removes.
    """

    satchel: float
    worker: float
    loop_run: float
    loop_wait: float
    s3: float
    origin: float
    postgres: float
    bench: float
    other: float

    def columns(self) -> str:
        """The figures as percentages, for a row."""
        values = (
            self.satchel,
            self.worker,
            self.loop_run,
            self.loop_wait,
            self.s3,
            self.origin,
            self.postgres,
            self.bench,
            self.other,
        )
        return " ".join(f"{v:>7.0%}" for v in values)


CPU_HEADER = "CPU%: " + " ".join(
    f"{name:>7}"
    for name in ("satchel", "worker", "loop", "loopwt", "s3", "origin", "pg", "bench", "other")
)


def worker_pid(pid: int) -> int | None:
    """The archive worker process `satchel serve` (pid) started, if it has one."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _schedstat(pid: int) -> tuple[float, float]:
    """Seconds the thread pid has run on a CPU and waited runnable for one, so far."""
    try:
        ran, waited, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(ran) / 1e9, int(waited) / 1e9


class Meter:
    """CPU counters of the processes involved, snapshot before and after a measurement."""

    def __init__(self, pids: Mapping[str, int | None], postgres_port: int | None) -> None:
        self.pids = pids
        self.postgres_port = postgres_port

    def snapshot(self) -> dict[str, float]:
        """The counters now (CPU seconds, and wall time)."""
        found = {}
        for name, pid in self.pids.items():
            stat = _stat(pid) if pid else None
            found[name] = stat[2] if stat else 0.0
        satchel = self.pids.get("satchel")
        worker = worker_pid(satchel) if satchel else None
        stat = _stat(worker) if worker else None
        found["worker"] = stat[2] if stat else 0.0
        found["loop_run"], found["loop_wait"] = _schedstat(satchel) if satchel else (0.0, 0.0)
        found["postgres"] = _postgres_cpu(self.postgres_port) if self.postgres_port else 0.0
        found["bench"] = _own_cpu()
        found["machine"] = _machine_busy()
        found["wall"] = time.monotonic()
        return found

    @staticmethod
    def use(before: Mapping[str, float], after: Mapping[str, float]) -> Cpu:
        """Cores used between two snapshots."""
        delta = {name: after[name] - before[name] for name in before}
        wall = delta.pop("wall") or 1e-9
        machine_busy = delta.pop("machine")
        loop_run, loop_wait = delta.pop("loop_run"), delta.pop("loop_wait")
        # moto is a child of this process, but its CPU only reaches `bench` once it is reaped.
        known = sum(delta.values())
        return Cpu(
            satchel=delta.get("satchel", 0.0) / wall,
            worker=delta.get("worker", 0.0) / wall,
            loop_run=loop_run / wall,
            loop_wait=loop_wait / wall,
            s3=delta.get("s3", 0.0) / wall,
            origin=delta.get("origin", 0.0) / wall,
            postgres=delta["postgres"] / wall,
            bench=delta["bench"] / wall,
            other=max(0.0, machine_busy - known) / wall,
        )

    @staticmethod
    def seconds(before: Mapping[str, float], after: Mapping[str, float], *names: str) -> float:
        """CPU seconds the processes `names` used between two snapshots."""
        return sum(after[name] - before[name] for name in names)


def find_pid(*needles: bytes) -> int | None:
    """A process whose command line holds every needle (moto's server, found by its port)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if all(needle in args for needle in needles):
                return int(entry.name)
    return None


# The archive worker's default CPU priority: the stand-ins for other machines get the same.
WORKER_NICE = Settings.archive_worker_nice


def lower_priority(pid: int | None, nice: int) -> None:
    """Run `pid` at CPU priority `nice`: its session's (autogroup) and each thread's own."""
    if pid is None or not nice:
        return
    # Each helper has a session of its own; where Linux groups by session, only the group's
    # nice value counts against other sessions.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as group:
        group.write(str(nice))
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of pid, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) * 1024
    return found


# --- the measuring run ---------------------------------------------------------------------------


@dataclass
class Context:
    """Everything the phases share."""

    args: argparse.Namespace
    workdir: Path
    database_url: str
    s3_endpoint_url: str
    origin_port: int
    moto_pid: int | None
    origin_pid: int
    objects: ObjectStore
    sink: ObjectStore
    sink_pid: int
    control_port: int = 0  # bench.hello: a bare Tornado server probed alongside, for reference
    project_id: str = ""
    part_size: int = 0

    @property
    def postgres_port(self) -> int:
        """Where PostgreSQL listens."""
        return urlsplit(self.database_url).port or 5432

    def meter(self, satchel: Server | None, objects: ObjectStore | None = None) -> Meter:
        """A CPU meter over satchel, the S3 server (moto or the sink) and the origin."""
        pids = {
            "satchel": satchel.proc.pid if satchel else None,
            "s3": self.sink_pid if objects is self.sink else self.moto_pid,
            "origin": self.origin_pid,
        }
        return Meter(pids, self.postgres_port)

    def server_env(self, concurrency: int, drain_timeout: float) -> dict[str, str]:
        """`satchel serve`'s environment."""
        env = {
            "DRAIN_TIMEOUT": f"{drain_timeout:g}",
            **os.environ,
            "DATABASE_URL": self.database_url,
            "S3_ENDPOINT_URL": self.s3_endpoint_url,
            "S3_BUCKET": BUCKET,
            "S3_REGION": REGION,
            "JOB_CONCURRENCY": str(concurrency),
            "FETCH_ALLOWLIST": f"{LOCALHOST}:{self.origin_port}",
            "MAX_ARCHIVE_BYTES": str(MAX_ARCHIVE_BYTES),
            "MAX_FILE_BYTES": str(MAX_FILE_BYTES),
            "LOG_LEVEL": "WARNING",
        }
        env.pop("ARCHIVE_PUBLIC_BASE_URL", None)
        return env

    @contextlib.contextmanager
    def satchel(
        self,
        name: str,
        concurrency: int,
        *,
        drain_timeout: float = 25,
        s3: str | None = None,
        nice: int = 0,
        inline: bool = False,
        log_level: str = "WARNING",
    ) -> Iterator[Server]:
        """A fresh `satchel serve` (on moto unless `s3` says otherwise), ready when PostgreSQL
        and S3 answer."""
        env = self.server_env(concurrency, drain_timeout)
        if s3:
            env["S3_ENDPOINT_URL"] = s3
        if inline:
            env["ARCHIVE_WORKER"] = "inline"
        env["LOG_LEVEL"] = log_level
        for item in self.args.server_env or ():
            key, _, value = item.partition("=")
            env[key] = value
        cmd = satchel_command()
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        with running(name, cmd, env=env, ready_path="/ready", workdir=self.workdir) as server:
            yield server


@dataclass(frozen=True)
class ArchiveResult:
    """One archive formed by Satchel."""

    task_id: str
    archive_bytes: int
    seconds: float  # processing -> task.archived, by the server's clock
    client_seconds: float  # POST -> finished seen in the table


async def ensure_project(ctx: Context, http: Http) -> None:
    """The project the benchmark's tasks belong to, created through the API once."""
    if not ctx.project_id:
        project = await http.json("POST", "/projects", {"name": "bench archive", "price": 1000})
        ctx.project_id = project["uuid"]


async def create_tasks(
    http: Http, project_id: str, file_sets: Sequence[Sequence[str]]
) -> list[str]:
    """One task per list of URLs, in one batch; their ids."""
    items = [
        {"name": f"bench archive {i}", "urls": list(urls), "project_id": project_id}
        for i, urls in enumerate(file_sets)
    ]
    created = await http.json("POST", "/tasks/batch_create", items)
    return [item["uuid"] for item in created["items"]]


async def wait_finished(
    conn: psycopg.AsyncConnection[Any], task_ids: Sequence[str], within: float = TASK_TIMEOUT
) -> dict[str, float]:
    """Wait until every task is finished; when each was seen so (time.monotonic())."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + within
    while len(seen) < len(task_ids):
        cur = await conn.execute(
            "SELECT uuid::text, status::text, error FROM task WHERE uuid = ANY(%s::uuid[])",
            [list(task_ids)],
        )
        for task_id, status, error in await cur.fetchall():
            if status == "failed":
                raise RuntimeError(f"task {task_id} failed: {error}")
            if status == "finished":
                seen.setdefault(task_id, time.monotonic())
        if time.monotonic() > deadline:
            raise RuntimeError(f"tasks not finished within {within:.0f} s: {task_ids}")
        await asyncio.sleep(POLL)
    return seen


async def wait_processing(
    conn: psycopg.AsyncConnection[Any], task_ids: Sequence[str], within: float = 60.0
) -> None:
    """Wait until every task is processing (its run has begun)."""
    deadline = time.monotonic() + within
    while True:
        cur = await conn.execute(
            "SELECT count(*) FROM task WHERE uuid = ANY(%s::uuid[]) AND status = 'processing'",
            [list(task_ids)],
        )
        row = await cur.fetchone()
        if row and row[0] == len(task_ids):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the runs did not all begin within {within:.0f} s")
        await asyncio.sleep(POLL)


async def archive_facts(
    conn: psycopg.AsyncConnection[Any], objects: ObjectStore, task_id: str
) -> tuple[str, int, float]:
    """The task's archive key and size, and its run's time from `processing` to `finished`."""
    cur = await conn.execute(
        "SELECT t.archive_key,"
        " (SELECT max(e.created_at) FROM event e WHERE e.task_id = t.uuid"
        "   AND e.type = 'task.updated' AND e.payload->>'status' = 'processing'"
        "   AND 'status' = ANY(e.changed)),"
        " (SELECT max(e.created_at) FROM event e WHERE e.task_id = t.uuid"
        "   AND e.type = 'task.archived')"
        " FROM task t WHERE t.uuid = %s",
        [task_id],
    )
    row = await cur.fetchone()
    if row is None or row[0] is None or row[1] is None or row[2] is None:
        raise RuntimeError(f"task {task_id} has no archive or no run events: {row}")
    key, started, finished = row
    head = await objects.client.head_object(Bucket=BUCKET, Key=key)
    return key, int(head["ContentLength"]), (finished - started).total_seconds()


async def delete_archives(objects: ObjectStore) -> None:
    """Delete every stored archive (moto holds them in memory and on its temp disk)."""
    listing = await objects.client.list_objects_v2(Bucket=BUCKET, Prefix="archives/")
    for item in listing.get("Contents", []):
        await objects.client.delete_object(Bucket=BUCKET, Key=item["Key"])
    uploads = await objects.client.list_multipart_uploads(Bucket=BUCKET)
    for upload in uploads.get("Uploads", []):
        await objects.client.abort_multipart_upload(
            Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"]
        )


async def run_archive(
    ctx: Context,
    http: Http,
    conn: psycopg.AsyncConnection[Any],
    files: Sequence[OriginFile],
    *,
    objects: ObjectStore | None = None,
) -> ArchiveResult:
    """One task through the pipeline (into `objects`, moto by default); deletes its archive."""
    objects = objects or ctx.objects
    started = time.monotonic()
    (task_id,) = await create_tasks(http, ctx.project_id, [[f.url(ctx.origin_port) for f in files]])
    seen = await wait_finished(conn, [task_id])
    key, size, seconds = await archive_facts(conn, objects, task_id)
    await objects.client.delete_object(Bucket=BUCKET, Key=key)
    return ArchiveResult(task_id, size, seconds, seen[task_id] - started)


async def baseline_upload(objects: ObjectStore, total: int, body: bytes) -> float:
    """Upload-only: `total` bytes as one multipart object, parts of `body`; the seconds taken.

    The requests are shaped as Satchel's: a CRC-32 checksummed upload, each part carrying its
    checksum (computed once for the reused part here, so the baseline pays less for it).
    """
    client = objects.client
    key = f"baseline/{uuid_module.uuid4()}.zip"
    part_size = len(body)
    started = time.perf_counter()
    reply = await client.create_multipart_upload(
        Bucket=BUCKET, Key=key, ContentType="application/zip", **CHECKSUM
    )
    upload_id = reply["UploadId"]
    slots = asyncio.Semaphore(PARTS_IN_FLIGHT)
    parts: dict[int, dict[str, Any]] = {}
    whole_crc = part_checksum(body)

    async def part(number: int, data: bytes) -> None:
        try:
            crc = whole_crc if data is body else part_checksum(data)
            answer = await client.upload_part(
                Bucket=BUCKET,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumCRC32=crc,
            )
            parts[number] = {"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32": crc}
        finally:
            slots.release()

    running_parts = []
    try:
        for number, offset in enumerate(range(0, total, part_size), start=1):
            size = min(part_size, total - offset)
            await slots.acquire()
            data = body if size == part_size else body[:size]
            running_parts.append(asyncio.create_task(part(number, data)))
        await asyncio.gather(*running_parts)
        await client.complete_multipart_upload(
            Bucket=BUCKET,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [parts[n] for n in sorted(parts)]},
        )
        seconds = time.perf_counter() - started
    except BaseException:
        await asyncio.gather(*running_parts, return_exceptions=True)
        await client.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id)
        raise
    head = await client.head_object(Bucket=BUCKET, Key=key)
    await client.delete_object(Bucket=BUCKET, Key=key)
    if int(head["ContentLength"]) != total:
        raise RuntimeError(f"baseline object holds {head['ContentLength']} bytes, not {total}")
    return seconds


# --- 1. throughput ------------------------------------------------------------------------------


THROUGHPUT_HEADER = (
    f"{'round':>5}  {'run':<9} {'in MiB':>7} {'out MiB':>7} {'all s':>6} {'upload':>6}"
    f" {'MiB/s':>6}  {'own':>5} {'s3':>5}  " + CPU_HEADER
)


def upload_window(log_path: Path, task_id: str) -> float | None:
    """Create -> complete of the task's upload, from the worker's "finished" log line."""
    with contextlib.suppress(OSError):
        for line in reversed(log_path.read_text(errors="replace").splitlines()):
            if task_id in line and '"upload_seconds"' in line:
                with contextlib.suppress(ValueError):
                    return float(json.loads(line)["upload_seconds"])
    return None


async def throughput(
    ctx: Context, conn: psycopg.AsyncConnection[Any], objects: ObjectStore, rounds_wanted: int
) -> dict[str, Any]:
    """Interleaved rounds of the pipeline and the upload-only baseline, into `objects`."""
    args = ctx.args
    files = mixed_files(args.mib * MIB, args.files, seed=1)
    downloaded = sum(f.size for f in files)
    into_moto = objects is ctx.objects
    if into_moto:
        print(f"\n1. throughput into moto, JOB_CONCURRENCY=1: {describe(files)}")
        print(
            f"   part size {ctx.part_size // MIB} MiB (part_size_for({MAX_ARCHIVE_BYTES // GIB}"
            f" GiB)), {PARTS_IN_FLIGHT} parts in flight; baseline: the same bytes from one"
            f" {ctx.part_size // MIB} MiB part reused, same S3 client settings, same moto"
        )
    else:
        print(
            "\n1b. the same into bench.s3sink (drops the bytes; no moto CPU, no 10 s/GiB"
            " complete): what the pipeline costs when S3 is not the bottleneck"
        )
    body = os.urandom(ctx.part_size)
    rounds: list[dict[str, Any]] = []
    s3 = None if into_moto else objects.client.meta.endpoint_url
    name = "satchel-throughput" if into_moto else "satchel-throughput-sink"
    with ctx.satchel(name, 1, s3=s3, log_level="INFO") as server:
        http = Http(server.port)
        await ensure_project(ctx, http)
        meter = ctx.meter(server, objects)
        # Warm-up, not counted: imports, connections and threads, and one object of the full
        # size each way, since the first one a fresh S3 server takes in costs it more (moto's
        # first round came out 10 to 40% slower than its later ones).
        warm = await run_archive(ctx, http, conn, files, objects=objects)
        await baseline_upload(objects, warm.archive_bytes, body)
        print(THROUGHPUT_HEADER, flush=True)
        archive_bytes = 0
        for number in range(1, rounds_wanted + 1):
            # Odd rounds (the first among them: the baseline needs the archive's size) start
            # with the pipeline, even ones with the baseline.
            order = ("pipeline", "baseline") if number % 2 else ("baseline", "pipeline")
            found: dict[str, Any] = {"round": number}
            for which in order:
                before = meter.snapshot()
                if which == "pipeline":
                    result = await run_archive(ctx, http, conn, files, objects=objects)
                    archive_bytes = result.archive_bytes
                    seconds = result.seconds
                    found["client_seconds"] = result.client_seconds
                    # The baseline's window: the upload's create to its complete. The pipeline's
                    # whole run adds the task's database writes and the read-back check.
                    uploading = upload_window(server.log, result.task_id)
                    if uploading is None:
                        raise RuntimeError(f"no upload_seconds logged in {server.log}")
                else:
                    seconds = uploading = await baseline_upload(objects, archive_bytes, body)
                after = meter.snapshot()
                cpu = meter.use(before, after)
                rate = archive_bytes / MIB / uploading
                # CPU seconds per GiB of archive: the uploader's own (Satchel, or this process
                # for the baseline) and the S3 server's; steadier than MiB/s on a shared machine.
                gib = archive_bytes / GIB
                own = meter.seconds(
                    before, after, *(("satchel", "worker") if which == "pipeline" else ("bench",))
                )
                s3_cpu = meter.seconds(before, after, "s3")
                found[which] = {
                    "seconds": seconds,
                    "upload_seconds": uploading,
                    "mib_s": rate,
                    "whole_mib_s": archive_bytes / MIB / seconds,
                    "cpu_s_per_gib": own / gib,
                    "s3_cpu_s_per_gib": s3_cpu / gib,
                    "cpu": asdict(cpu),
                }
                shown_in = downloaded if which == "pipeline" else archive_bytes
                print(
                    f"{number:>5}  {which:<9} {shown_in / MIB:>7.1f} {archive_bytes / MIB:>7.1f}"
                    f" {seconds:>6.2f} {uploading:>6.2f} {rate:>6.1f}  {own / gib:>5.2f}"
                    f" {s3_cpu / gib:>5.2f}  "
                    f" {cpu.columns()}",
                    flush=True,
                )
            found["ratio"] = found["pipeline"]["mib_s"] / found["baseline"]["mib_s"]
            found["whole_ratio"] = (
                found["pipeline"]["whole_mib_s"] / found["baseline"]["whole_mib_s"]
            )
            rounds.append(found)
            await delete_archives(objects)
        if args.profile:
            await profile_pipeline(ctx, server, http, conn, files, objects)
        http.close()
    ratios = [r["ratio"] for r in rounds]
    summary = {
        "files": describe(files),
        "downloaded_bytes": downloaded,
        "archive_bytes": archive_bytes,
        "rounds": rounds,
        "pipeline_mib_s": statistics.median(r["pipeline"]["mib_s"] for r in rounds),
        "baseline_mib_s": statistics.median(r["baseline"]["mib_s"] for r in rounds),
        "ratios": ratios,
        "ratio": statistics.median(ratios),
        "whole_ratios": [r["whole_ratio"] for r in rounds],
        "whole_ratio": statistics.median(r["whole_ratio"] for r in rounds),
    }
    for which in ("pipeline", "baseline"):
        summary[f"{which}_cpu_s_per_gib"] = statistics.median(
            r[which]["cpu_s_per_gib"] for r in rounds
        )
    print(
        "   own, s3: CPU seconds per GiB of archive of the uploading process (Satchel, or this"
        " one for the baseline) and of the S3 server; loop, loopwt: Satchel's event-loop thread"
        " on a CPU, and runnable but waiting for one"
    )
    print(
        "   all s: the task's whole run (processing -> task.archived, server clock: with the"
        " database writes and the read-back check); upload: create -> complete of the multipart"
        " upload, as the baseline is timed; MiB/s over the upload"
    )
    print(
        f"   medians: pipeline {summary['pipeline_mib_s']:.1f} MiB/s, baseline"
        f" {summary['baseline_mib_s']:.1f} MiB/s; ratio per round"
        f" {', '.join(f'{r:.3f}' for r in ratios)} -> {summary['ratio']:.3f};"
        f" whole run / baseline {', '.join(f'{r:.3f}' for r in summary['whole_ratios'])}"
        f" -> {summary['whole_ratio']:.3f}"
    )
    return summary


# --- 2. memory --------------------------------------------------------------------------------


async def peak_memory(ctx: Context, conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
    """VmHWM of a fresh server forming one archive, per size and repeat, into the sink or moto.

    The allocator makes one run's peak jitter by several MiB, so each size runs `--rss-repeats`
    times (sizes interleaved), and a size's figure is its highest peak.
    """
    args = ctx.args
    objects = ctx.objects if args.memory_s3 == "moto" else ctx.sink
    sizes = [int(s) for s in args.rss_mib]
    where = "moto" if objects is ctx.objects else "bench.s3sink (keeps sizes and tails only)"
    print(
        f"\n2. peak RSS of the archive worker, a fresh satchel serve per archive,"
        f" {args.rss_files} random files each, into {where}; {args.rss_repeats} runs per size,"
        " sizes interleaved"
    )
    print(
        f"{'run':>3} {'archive':>8} {'in MiB':>7} {'seconds':>7} {'MiB/s':>6} {'CPU s/GiB':>9}"
        f" {'idle RSS':>9}"
        f" {'peak RSS':>9} {'peak-idle':>9}  (MiB; peak = VmHWM; VmRSS sampled every 50 ms)"
    )
    found: dict[str, Any] = {"runs": [], "sizes": {}}
    for repeat in range(1, args.rss_repeats + 1):
        for mib in sizes:
            run = await _one_peak(ctx, conn, objects, mib)
            found["runs"].append(run)
            print(
                f"{repeat:>3} {run['label']:>8} {mib:>7} {run['seconds']:>7.2f}"
                f" {run['archive_bytes'] / MIB / run['seconds']:>6.1f} {run['cpu_s_per_gib']:>9.2f}"
                f" {run['idle_rss'] / MIB:>9.1f} {run['peak_rss'] / MIB:>9.1f}"
                f" {(run['peak_rss'] - run['idle_rss']) / MIB:>9.1f}"
                f"  (sampled max {run['sampled_max_rss'] / MIB:.1f})",
                flush=True,
            )
    for run in found["runs"]:
        mine = found["sizes"].setdefault(run["label"], {"peak_rss": 0, "peaks": []})
        mine["peaks"].append(run["peak_rss"])
        mine["peak_rss"] = max(mine["peak_rss"], run["peak_rss"])
    peaks = [v["peak_rss"] for v in found["sizes"].values()]
    found["difference"] = peaks[-1] - peaks[0]
    labels = list(found["sizes"])
    print(
        "   highest peak per size: "
        + ", ".join(f"{label} {found['sizes'][label]['peak_rss'] / MIB:.1f}" for label in labels)
        + f" MiB; difference {labels[-1]} - {labels[0]}: {found['difference'] / MIB:+.1f} MiB"
    )
    return found


async def _one_peak(
    ctx: Context, conn: psycopg.AsyncConnection[Any], objects: ObjectStore, mib: int
) -> dict[str, Any]:
    files = random_files(mib * MIB, ctx.args.rss_files, seed=100 + mib)
    s3 = None if objects is ctx.objects else objects.client.meta.endpoint_url
    with ctx.satchel(f"satchel-rss-{mib}", 1, s3=s3) as server:
        pid = await archive_process(server)
        http = Http(server.port)
        await ensure_project(ctx, http)
        idle = memory(pid)
        cpu_before = _stat(pid)
        samples: list[int] = []

        async def sample() -> None:
            while True:
                with contextlib.suppress(OSError):
                    samples.append(memory(pid)["VmRSS"])
                await asyncio.sleep(RSS_SAMPLE)

        sampler = asyncio.create_task(sample())
        try:
            result = await run_archive(ctx, http, conn, files, objects=objects)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        after = memory(pid)
        cpu_after = _stat(pid)
        http.close()
    await delete_archives(objects)
    cpu = (cpu_after[2] - cpu_before[2]) if cpu_before and cpu_after else 0.0
    return {
        "cpu_s_per_gib": cpu / (result.archive_bytes / GIB),
        "label": f"{mib} MiB" if mib < 1024 else f"{mib / 1024:g} GiB",
        "archive_bytes": result.archive_bytes,
        "seconds": result.seconds,
        "idle_rss": idle["VmRSS"],
        "peak_rss": after["VmHWM"],
        "sampled_max_rss": max(samples, default=0),
    }


async def archive_process(server: Server) -> int:
    """The process that forms `server`'s archives: its worker, once started, or itself."""
    for _ in range(200):
        if (pid := worker_pid(server.proc.pid)) is not None:
            await asyncio.sleep(WORKER_SETTLE)  # imports and pools: the idle figure comes after
            return pid
        await asyncio.sleep(0.05)
    return server.proc.pid  # ARCHIVE_WORKER=inline (from --server-env)


# --- 3. responsiveness ----------------------------------------------------------------------


@dataclass
class Probe:
    """Latencies of one fixed-rate client."""

    path: str
    sent_at: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    def within(self, end: float) -> list[float]:
        """Latencies of the requests sent before `end` (time.monotonic())."""
        return [lat for at, lat in zip(self.sent_at, self.latencies, strict=True) if at < end]


def percentiles(latencies: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max in milliseconds."""
    if len(latencies) < 2:
        return {"n": len(latencies), "p50": 0.0, "p99": 0.0, "max": 0.0}
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "n": len(latencies),
        "p50": cuts[49] * 1000,
        "p99": cuts[98] * 1000,
        "max": max(latencies) * 1000,
    }


async def fixed_rate(port: int, path: str, interval: float, seconds: float) -> Probe:
    """GET path every `interval` s for `seconds`, each on time whether the last answered or not."""
    http = Http(port, keep_alive=True)
    probe = Probe(path)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one() -> None:
        sent_wall = time.monotonic()
        sent = time.perf_counter()
        try:
            status, _ = await http.request("GET", path, time_limit=10)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            probe.errors += 1
            return
        if status != 200:
            probe.errors += 1
            return
        probe.sent_at.append(sent_wall)
        probe.latencies.append(time.perf_counter() - sent)

    requests = []
    for number in range(int(seconds / interval)):
        delay = start + number * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        requests.append(asyncio.create_task(one()))
    await asyncio.gather(*requests)
    http.close()
    return probe


PROBE_HEADER = (
    f"{'phase':<8} {'request':<20} {'n':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'err':>4}   "
    + CPU_HEADER
)


async def probes(port: int, seconds: float, control: int) -> tuple[Probe, Probe, Probe]:
    """The two fixed-rate clients side by side, and one for the control server (`control`).

    This process's own garbage collector stays off meanwhile: a full collection of its heap
    (botocore's models, for the baseline) takes tens of ms, and would show up as server latency.
    """
    gc.collect()
    gc.disable()
    try:
        health, tasks, hello = await asyncio.gather(
            fixed_rate(port, HEALTH_PATH, 0.02, seconds),
            fixed_rate(port, TASKS_PATH, 0.05, seconds),
            fixed_rate(control, "/", 0.02, seconds),
        )
    finally:
        gc.enable()
    return health, tasks, hello


async def responsiveness(ctx: Context, conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
    """Idle, then while JOB_CONCURRENCY archives run: /health and /tasks latencies."""
    args = ctx.args
    concurrency = args.concurrency
    sets = [
        mixed_files(args.load_mib * MIB, args.load_files, seed=200 + i) for i in range(concurrency)
    ]
    title = (
        f"\n3. responsiveness, JOB_CONCURRENCY={concurrency}: GET {HEALTH_PATH} every 20 ms and"
        f" GET {TASKS_PATH} at 20 req/s, {args.load_seconds:g} s idle, then while {concurrency}"
        f" archives run ({describe(sets[0])} each)"
    )
    found = _with_goals(await _probe_phase(ctx, conn, sets, title, "satchel-load", ""))
    if args.load_rate:
        rate = args.load_rate * 1e6 / concurrency
        title = (
            f"\n3c. the same with each archive downloading at {rate / 1e6:g} MB/s"
            f" ({args.load_rate:g} MB/s in all, about what one NIC of"
            f" {args.load_rate * 8 / 1000:g} Gbit/s delivers; bench.origin paces the bodies)"
        )
        paced = await _probe_phase(ctx, conn, sets, title, "satchel-paced", "nic:", rate=rate)
        found["paced"] = _with_goals(paced)
        found["paced"]["load_rate_mb_s"] = args.load_rate
    if args.inline:
        title = (
            "\n3b. the same with ARCHIVE_WORKER=inline: the archives on the API's own event loop,"
            " for comparison"
        )
        found["inline"] = await _probe_phase(
            ctx, conn, sets, title, "satchel-inline", "in:", inline=True
        )
    return found


async def _probe_phase(
    ctx: Context,
    conn: psycopg.AsyncConnection[Any],
    sets: Sequence[Sequence[OriginFile]],
    title: str,
    name: str,
    label: str,
    *,
    inline: bool = False,
    rate: float = 0,
) -> dict[str, Any]:
    """One fresh `satchel serve`, probed idle and then while it forms one archive per set."""
    print(title)
    print(PROBE_HEADER, flush=True)
    # DRAIN_TIMEOUT=0: once measured, stopping the server cancels the runs and aborts their
    # uploads instead of waiting for archives nobody needs.
    concurrency = ctx.args.concurrency
    with ctx.satchel(name, concurrency, drain_timeout=0, inline=inline) as server:
        return await _idle_and_loaded(ctx, conn, server, server, sets, label, rate=rate)


def _with_goals(found: dict[str, Any]) -> dict[str, Any]:
    """The figures the goals are about: loaded /health p99, and loaded / idle /tasks p99."""
    found["lag_p99_ms"] = found["loaded"]["health"]["p99"]
    idle_p99 = found["idle"]["tasks"]["p99"]
    found["tasks_factor"] = found["loaded"]["tasks"]["p99"] / idle_p99 if idle_p99 else 0.0
    return found


async def _idle_and_loaded(
    ctx: Context,
    conn: psycopg.AsyncConnection[Any],
    probed: Server,
    runner: Server,
    sets: Sequence[Sequence[OriginFile]],
    label: str,
    *,
    rate: float = 0,
) -> dict[str, Any]:
    """Probe `probed` idle, then while `runner` forms one archive per set (each downloading at
    `rate` bytes/s, when given); stop the runs."""
    args = ctx.args
    found: dict[str, Any] = {}
    meter = ctx.meter(probed)
    warm = Http(probed.port)
    for _ in range(20):
        await warm.json("GET", TASKS_PATH)
    warm.close()
    before = meter.snapshot()
    found_probes = await probes(probed.port, args.load_seconds, ctx.control_port)
    cpu = meter.use(before, meter.snapshot())
    found["idle"] = _probe_rows(f"{label}idle", found_probes, cpu, None)

    http = Http(probed.port)
    await ensure_project(ctx, http)
    paced = f"?rate={rate:.0f}" if rate else ""
    urls = [[f.url(ctx.origin_port) + paced for f in files] for files in sets]
    task_ids = await create_tasks(http, ctx.project_id, urls)
    http.close()
    await wait_processing(conn, task_ids)
    await asyncio.sleep(args.load_warmup)
    before = meter.snapshot()
    first_done = asyncio.create_task(_first_finished(ctx.database_url, task_ids))
    found_probes = await probes(probed.port, args.load_seconds, ctx.control_port)
    cpu = meter.use(before, meter.snapshot())
    end = first_done.result() if first_done.done() else float("inf")
    first_done.cancel()
    found["loaded"] = _probe_rows(f"{label}loaded", found_probes, cpu, end)
    if end != float("inf"):
        print(
            f"   note: an archive finished {end - before['wall']:.1f} s into the window;"
            " only requests sent before then count"
        )
    if args.profile and probed is runner:
        await profile_load(ctx, runner)
    found["peak_rss"] = memory(worker_pid(runner.proc.pid) or runner.proc.pid)["VmHWM"]
    cur = await conn.execute(
        "SELECT status::text, count(*) FROM task WHERE uuid = ANY(%s::uuid[]) GROUP BY 1",
        [task_ids],
    )
    found["statuses"] = statuses = dict(await cur.fetchall())
    print(
        f"   peak RSS of the process forming the {len(sets)} archives:"
        f" {found['peak_rss'] / MIB:.1f} MiB; the runs at the end: {statuses}"
        " (then stopped, uploads aborted)"
    )
    # Stopping the runner cancels the runs (DRAIN_TIMEOUT=0); no later server may take them up.
    runner.proc.terminate()
    await asyncio.to_thread(runner.proc.wait, 30)
    await conn.execute(
        "UPDATE task SET status = 'failed', error = 'stopped by the benchmark', upload_id = NULL"
        " WHERE uuid = ANY(%s::uuid[]) AND status <> 'finished'",
        [task_ids],
    )
    await delete_archives(ctx.objects)
    if statuses.get("failed"):
        raise RuntimeError(f"archives failed under load: {statuses}; see the satchel logs")
    return found


async def _first_finished(url: str, task_ids: Sequence[str]) -> float:
    """time.monotonic() when the first of the tasks was seen finished (or failed)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as own:
        while True:
            cur = await own.execute(
                "SELECT count(*) FROM task WHERE uuid = ANY(%s::uuid[])"
                " AND status IN ('finished', 'failed')",
                [list(task_ids)],
            )
            row = await cur.fetchone()
            if row and row[0]:
                return time.monotonic()
            await asyncio.sleep(POLL)


def _probe_rows(phase: str, probed: Sequence[Probe], cpu: Cpu, end: float | None) -> dict[str, Any]:
    found: dict[str, Any] = {"cpu": asdict(cpu)}
    for name, probe in zip(("health", "tasks", "control"), probed, strict=True):
        latencies = probe.within(end) if end is not None else probe.latencies
        figures = {**percentiles(latencies), "errors": probe.errors}
        found[name] = figures
        print(
            f"{phase:<8} {_probe_label(probe.path):<20} {figures['n']:>5} {figures['p50']:>7.2f}"
            f" {figures['p99']:>7.2f} {figures['max']:>7.1f} {probe.errors:>4}   {cpu.columns()}",
            flush=True,
        )
    return found


def _probe_label(path: str) -> str:
    return "hello GET / (control)" if path == "/" else f"GET {path}"


# --- profiling (--profile) ------------------------------------------------------------------


def py_spy() -> str | None:
    """py-spy from the venv or PATH."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


async def record_profile(pid: int, seconds: float, out: Path) -> asyncio.subprocess.Process | None:
    """Start `py-spy record` on pid for `seconds` (collapsed stacks, per thread) into out."""
    binary = py_spy()
    if binary is None:
        print("   profile skipped: py-spy is not installed")
        return None
    cmd = [binary, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100"]
    cmd += ["--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    return await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def profile_pipeline(
    ctx: Context,
    server: Server,
    http: Http,
    conn: psycopg.AsyncConnection[Any],
    files: Sequence[OriginFile],
    objects: ObjectStore,
) -> None:
    """One more (unmeasured) pipeline run under py-spy."""
    where = "moto" if objects is ctx.objects else "bench.s3sink"
    out = ctx.workdir / f"profile-pipeline-{where}.txt"
    proc = await record_profile(await archive_process(server), ctx.args.profile, out)
    if proc is None:
        return
    await run_archive(ctx, http, conn, files, objects=objects)
    await proc.wait()
    title = f"satchel serve forming one archive into {where} (first {ctx.args.profile:g} s)"
    print_profile(out, title)
    await delete_archives(objects)


async def profile_load(ctx: Context, server: Server) -> None:
    """py-spy while the concurrent archives still run."""
    out = ctx.workdir / "profile-load.txt"
    proc = await record_profile(server.proc.pid, ctx.args.profile, out)
    if proc is not None:
        await proc.wait()
        print_profile(out, f"satchel serve with {ctx.args.concurrency} archives running")


def print_profile(path: Path, title: str, top: int = 15) -> None:
    """Per thread group (event loop, zip workers, others): its share and busiest functions."""
    groups: dict[str, tuple[collections.Counter[str], collections.Counter[str]]] = {}
    sizes: collections.Counter[str] = collections.Counter()
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            thread, *frames = stack.split(";")
            if not frames:
                continue
            count = int(count_text)
            group = (
                "event loop (MainThread)"
                if "MainThread" in thread
                else "zip workers"
                if "satchel-zip" in thread
                else "other threads"
            )
            own, inclusive = groups.setdefault(
                group, (collections.Counter(), collections.Counter())
            )
            short = [_function(frame) for frame in frames]
            own[short[-1]] += count
            for frame in set(short):
                inclusive[frame] += count
            sizes[group] += count
            total += count
    if not total:
        print(f"   profile of {title}: no samples")
        return
    print(f"\nprofile of {title}: {total} samples (py-spy, runnable threads only)")
    for group, size in sizes.most_common():
        own, inclusive = groups[group]
        print(f"  {group}: {size / total:.1%} of the samples; top {top} by self time:")
        for frame, count in own.most_common(top):
            print(f"    {count / size:>6.1%}  {frame}")
        if group.startswith("event loop"):
            print(f"  {group}, by inclusive time (Satchel's and the libraries' calls):")
            shown = 0
            for frame, count in inclusive.most_common():
                if "asyncio/" in frame or frame.endswith(("(satchel)", "(server/main.py)")):
                    continue
                print(f"    {count / size:>6.1%}  {frame}")
                shown += 1
                if shown == top:
                    break


def _function(frame: str) -> str:
    name, _, where = frame.partition(" (")
    location = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(location).parts[-2:]) if location else "?"
    return f"{name} ({short})"


# --- report -------------------------------------------------------------------------------------


def verdicts(summary: Mapping[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(figure, value, goal, met) rows of the final table."""
    rows: list[tuple[str, str, str, bool | None]] = []
    if "throughput" in summary:
        t = summary["throughput"]
        rows.append(("pipeline MiB/s (median, upload)", f"{t['pipeline_mib_s']:.1f}", "", None))
        rows.append(("baseline MiB/s (median)", f"{t['baseline_mib_s']:.1f}", "", None))
        rows.append(
            (
                "pipeline / baseline (create -> complete)",
                f"{t['ratio']:.3f}",
                f">= {GOAL_RATIO}",
                t["ratio"] >= GOAL_RATIO,
            )
        )
        rows.append(
            (
                "  whole run (processing -> archived) / baseline",
                f"{t['whole_ratio']:.3f}",
                "(info)",
                None,
            )
        )
    if "throughput_sink" in summary:
        t = summary["throughput_sink"]
        rows.append(
            (
                "  the same into bench.s3sink: ratio",
                f"{t['ratio']:.3f}",
                "(info)",
                None,
            )
        )
        rows.append(
            (
                "  Satchel CPU s per GiB (sink, median)",
                f"{t['pipeline_cpu_s_per_gib']:.2f} s",
                "(info)",
                None,
            )
        )
    if "memory" in summary:
        m = summary["memory"]
        for label, values in m["sizes"].items():
            rows.append(
                (f"peak RSS, {label} archive", f"{values['peak_rss'] / MIB:.1f} MiB", "", None)
            )
        diff = m["difference"] / MIB
        rows.append(
            (
                "peak RSS difference",
                f"{diff:+.1f} MiB",
                f"<= {GOAL_RSS_DIFF_MIB:g} MiB",
                abs(diff) <= GOAL_RSS_DIFF_MIB,
            )
        )
    if "responsiveness" in summary:
        r = summary["responsiveness"]
        rows.extend(_responsiveness_rows(r, "loaded"))
        if "paced" in r:
            rate = f"{r['paced']['load_rate_mb_s']:g} MB/s"
            rows.extend(_responsiveness_rows(r["paced"], f"loaded at {rate}"))
        if "inline" in r:
            inline = r["inline"]["loaded"]
            rows.append(
                (
                    "  ARCHIVE_WORKER=inline: /health, /tasks p99",
                    f"{inline['health']['p99']:.1f}, {inline['tasks']['p99']:.1f} ms",
                    "(info)",
                    None,
                )
            )
    return rows


def _responsiveness_rows(
    r: Mapping[str, Any], loaded: str
) -> list[tuple[str, str, str, bool | None]]:
    """The responsiveness goals of one loaded run, with its idle figures and the control."""
    control = (r["idle"]["control"]["p99"], r["loaded"]["control"]["p99"])
    return [
        ("GET /health p99, idle", f"{r['idle']['health']['p99']:.2f} ms", "", None),
        (
            f"event-loop lag p99 (GET /health, {loaded})",
            f"{r['lag_p99_ms']:.2f} ms",
            f"< {GOAL_LAG_P99_MS:g} ms",
            r["lag_p99_ms"] < GOAL_LAG_P99_MS,
        ),
        (
            f"GET /tasks p99 idle -> {loaded}",
            f"{r['idle']['tasks']['p99']:.2f} -> {r['loaded']['tasks']['p99']:.2f} ms",
            "",
            None,
        ),
        (
            f"GET /tasks p99 {loaded} / idle",
            f"{r['tasks_factor']:.2f}x",
            f"<= {GOAL_TASKS_P99_FACTOR:g}x",
            r["tasks_factor"] <= GOAL_TASKS_P99_FACTOR,
        ),
        (
            f"  control (hello GET /) p99 idle -> {loaded}",
            f"{control[0]:.2f} -> {control[1]:.2f} ms",
            "(info)",
            None,
        ),
    ]


def print_verdicts(rows: Sequence[tuple[str, str, str, bool | None]]) -> None:
    """The final table."""
    print(f"\n{'figure':<42} {'value':>22}  {'goal':<12} result")
    for figure, value, goal, met in rows:
        result = "" if met is None else ("pass" if met else "MISSED")
        print(f"{figure:<42} {value:>22}  {goal:<12} {result}")


# --- setup and the run --------------------------------------------------------------------------


def seed_finished(url: str, project_id: str, count: int) -> None:
    """`count` finished tasks without archive keys (no presigning), the oldest in the table."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO task (project_id, name, description, urls, status, progress,"
            " created_at, updated_at)"
            " SELECT %s, 'Seeded task ' || i, 'Finished before the benchmark began',"
            "  ARRAY['https://cdn.example.com/projects/' || i || '/logo.png',"
            "        'https://files.example.org/projects/' || i || '/brief.pdf'],"
            "  'finished', 100, now() - interval '1 day' + i * interval '1 second',"
            "  now() - interval '1 day' + i * interval '1 second'"
            " FROM generate_series(1, %s) AS i",
            [project_id, count],
        )
        conn.execute("VACUUM ANALYZE project, task")


def prepare_database(url: str, *, shared: bool) -> str:
    """Migrate (on a shared database inside SCHEMA); returns the URL to serve from."""
    if shared:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            conn.execute(f"CREATE SCHEMA {SCHEMA}")
        url = with_search_path(url, SCHEMA)
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO project (name, description, price, created_at, updated_at)"
            " VALUES ('Seeded project', 'Holds the finished tasks GET /tasks lists', 100000,"
            " now() - interval '2 days', now() - interval '2 days') RETURNING uuid::text"
        ).fetchone()
    assert row is not None
    seed_finished(url, row[0], SEEDED_TASKS)
    return url


def loopback(url: str) -> bool:
    """Whether url points at this machine."""
    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


@contextlib.asynccontextmanager
async def object_store(endpoint: str) -> AsyncIterator[ObjectStore]:
    """The benchmark's own S3 client, with Satchel's client settings."""
    objects = ObjectStore(
        bucket=BUCKET, region=REGION, endpoint_url=endpoint, link_ttl=3600, public_base_url=None
    )
    async with objects.running():
        await ensure_bucket(objects.client, BUCKET, region=REGION)
        yield objects


async def measure(ctx: Context) -> dict[str, Any]:
    """The three phases, as chosen on the command line."""
    summary: dict[str, Any] = {}
    phases = set(ctx.args.only or ("throughput", "memory", "responsiveness"))
    async with await psycopg.AsyncConnection.connect(ctx.database_url, autocommit=True) as conn:
        if "throughput" in phases:
            summary["throughput"] = await throughput(ctx, conn, ctx.objects, ctx.args.rounds)
            if ctx.args.sink_rounds:
                summary["throughput_sink"] = await throughput(
                    ctx, conn, ctx.sink, ctx.args.sink_rounds
                )
        if "memory" in phases:
            summary["memory"] = await peak_memory(ctx, conn)
        if "responsiveness" in phases:
            summary["responsiveness"] = await responsiveness(ctx, conn)
    return summary


def run(args: argparse.Namespace, workdir: Path) -> int:
    """Services, origin, then the phases; returns the exit code."""
    info = machine()
    print(" ".join(f"{key}={value}" for key, value in info.items()), flush=True)
    print(
        f"moto, bench.s3sink and bench.origin (stand-ins for other machines) run at nice"
        f" {args.infra_nice}; the archive worker at nice {WORKER_NICE} unless --server-env"
        " says otherwise",
        flush=True,
    )
    info["infra_nice"] = str(args.infra_nice)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    with services(workdir) as found:
        s3 = found.s3_endpoint_url
        if not s3 or not loopback(s3):
            print(f"S3_ENDPOINT_URL must name a loopback S3 (moto), not {s3!r}")
            return 2
        url = prepare_database(found.database_url, shared=not found.local)
        port = urlsplit(s3).port
        moto_pid = find_pid(b"moto.server", str(port).encode()) if port else None
        origin_cmd = [sys.executable, "-m", "bench.origin"]
        try:
            with running(
                "origin", origin_cmd, env=os.environ, ready_path="/health", workdir=workdir
            ) as origin:
                # Threads moto starts later for its requests inherit the priority.
                lower_priority(moto_pid, args.infra_nice)
                lower_priority(origin.proc.pid, args.infra_nice)
                summary = asyncio.run(_measure(args, workdir, url, s3, origin, moto_pid))
        finally:
            if not found.local:
                with psycopg.connect(found.database_url, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    rows = verdicts(summary)
    print_verdicts(rows)
    print(f"load average after the run: {Path('/proc/loadavg').read_text().split()[:3]}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "summary": summary}, indent=2) + "\n")
    errors = _probe_errors(summary.get("responsiveness", {}))
    if errors:
        print(f"{errors} probe requests failed")
    return 1 if errors else 0


def _probe_errors(found: Mapping[str, Any]) -> int:
    """Failed probe requests anywhere in the responsiveness figures."""
    total = 0
    for value in found.values():
        if isinstance(value, Mapping):
            total += int(value.get("errors", 0)) + _probe_errors(value)
    return total


async def _measure(
    args: argparse.Namespace, workdir: Path, url: str, s3: str, origin: Server, moto: int | None
) -> dict[str, Any]:
    sink_cmd = [sys.executable, "-m", "bench.s3sink"]
    hello_cmd = [sys.executable, "-m", "bench.hello"]
    with (
        running("s3sink", sink_cmd, env=os.environ, ready_path="/", workdir=workdir) as sink,
        running("hello", hello_cmd, env=os.environ, ready_path="/", workdir=workdir) as hello,
    ):
        lower_priority(sink.proc.pid, args.infra_nice)
        async with (
            object_store(s3) as objects,
            object_store(f"http://{LOCALHOST}:{sink.port}") as sink_objects,
        ):
            ctx = Context(
                args=args,
                workdir=workdir,
                database_url=url,
                s3_endpoint_url=s3,
                origin_port=origin.port,
                moto_pid=moto,
                origin_pid=origin.proc.pid,
                objects=objects,
                sink=sink_objects,
                sink_pid=sink.proc.pid,
                control_port=hello.port,
                part_size=part_size_for(MAX_ARCHIVE_BYTES),
            )
            try:
                return await measure(ctx)
            finally:
                await delete_archives(objects)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.archive", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="throughput rounds")
    parser.add_argument("--mib", type=int, default=1024, help="throughput: MiB of files")
    parser.add_argument("--files", type=int, default=16, help="throughput: files")
    parser.add_argument(
        "--sink-rounds", type=int, default=2, help="throughput rounds into bench.s3sink (0: none)"
    )
    parser.add_argument("--rss-mib", nargs="+", default=["256", "4096"], help="archive sizes")
    parser.add_argument("--rss-files", type=int, default=4, help="files per memory archive")
    parser.add_argument("--rss-repeats", type=int, default=2, help="runs per archive size")
    parser.add_argument(
        "--memory-s3",
        choices=("sink", "moto"),
        default="sink",
        help="where the memory phase uploads: moto needs ~4x a 4 GiB archive in RAM",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="JOB_CONCURRENCY under load")
    parser.add_argument(
        "--load-mib",
        type=int,
        default=1024,
        help="MiB per concurrent archive (outlasts the window)",
    )
    parser.add_argument("--load-files", type=int, default=8, help="files per concurrent archive")
    parser.add_argument(
        "--load-rate",
        type=float,
        default=125.0,
        metavar="MB_S",
        help="3c: the concurrent archives download this many MB/s in all (0: skip 3c)",
    )
    parser.add_argument("--load-seconds", type=float, default=15.0, help="idle and loaded windows")
    parser.add_argument("--load-warmup", type=float, default=1.0, help="seconds before probing")
    parser.add_argument(
        "--no-inline",
        dest="inline",
        action="store_false",
        help="skip 3b: the same with ARCHIVE_WORKER=inline (archives on the API event loop)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        metavar="KEY=VALUE",
        help="extra environment for every satchel serve (e.g. MALLOC_ARENA_MAX=2)",
    )
    parser.add_argument(
        "--only", nargs="+", choices=("throughput", "memory", "responsiveness"), help="phases"
    )
    parser.add_argument(
        "--infra-nice",
        type=int,
        default=WORKER_NICE,
        metavar="N",
        help="CPU priority (nice) of the S3 server, the sink and the origin: stand-ins for other"
        " machines; the default is the archive worker's, 0 lets them compete with the API",
    )
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS", help="py-spy")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.archive`."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="satchel-bench-archive-") as tmp:
        try:
            return run(args, Path(tmp))
        except BaseException:
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- last lines of {log.name}:\n{tail(log, 15)}", file=sys.stderr)
            raise


if __name__ == "__main__":
    sys.exit(main())
