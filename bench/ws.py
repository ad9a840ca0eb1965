"""Websocket fan-out: 1,000 clients on two instances while 100 tasks change several times a second.

`python -m bench.ws [--seconds 30 --clients 1000 --filter project ...]` starts two `satchel serve`
instances on one PostgreSQL, creates 10 projects of 10 tasks over REST, and connects the clients
from two client processes (asyncio + tornado.websocket), evenly over both instances. Then a
driver renames the 10 tasks of one project with `POST /tasks/batch_update` every 20 to 50 ms,
alternating instances and projects. Each new name carries the time it was sent.

It reports the latency from each event's commit (the outbox row's `created_at`) to its receipt
(goal: p99 <= 200 ms), messages/s delivered, whether each client received exactly the events its
filter selects (in increasing id order, none twice, no 1013 close), and the server memory per
connection (RSS before the clients connect against after).

By default each client follows one project (`?project_id=`), as a project page would: an event
goes to the 100 clients of its project. `--filter task` gives each client one task,
`--filter none` sends every event to every client (1,000 messages per event).

PostgreSQL and S3 are local throwaway ones in a temporary directory, unless DATABASE_URL is set:
then everything goes into a schema of its own (satchel_bench_ws), dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import queue
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import orjson
import psycopg
import tornado.httpclient
import tornado.websocket

from bench import (
    LOCALHOST,
    REPO_ROOT,
    CpuMeter,
    Server,
    running,
    satchel_command,
    services,
    tail,
    with_search_path,
)
from bench.api import machine, server_env
from storage.migrate import migrate

GOAL_P99_MS = 200.0
SCHEMA = "satchel_bench_ws"  # where a shared DATABASE_URL gets its data
INSTANCES = ("A", "B")
PROJECTS = 10
TASKS_PER_PROJECT = 10
# Websocket handshakes in flight per client process: the servers' listen backlog is 128.
CONNECT_CONCURRENCY = 50
CONNECT_TIMEOUT = 30.0
# Batches in flight at once; past this the driver waits, and counts the start as late.
DRIVER_IN_FLIGHT = 4
# After the last batch, how long the clients may take to receive their last expected event.
DRAIN_TIMEOUT = 20.0
# Send-to-receipt latencies are counted in buckets this wide (seconds).
BUCKET = 0.0001


# --- the client processes ----------------------------------------------------------------
# `python -m bench.ws client` reads a JSON plan on its first stdin line, connects, prints
# "CONNECTED {...}", and on a "stop" line waits for the last expected ids, closes, and prints
# "RESULT {...}" with its counts, a latency histogram and (id, receipt time) pairs.


class Conn:
    """One websocket client and what it received."""

    __slots__ = (
        "close_code",
        "closed",
        "count",
        "disorder",
        "error",
        "first",
        "id_sq",
        "id_sum",
        "instance",
        "key",
        "last",
        "other",
        "recorder",
        "stopping",
        "url",
        "ws",
    )

    def __init__(self, url: str, instance: int, key: str, recorder: Recorder) -> None:
        self.url = url
        self.instance = instance
        self.key = key  # the project or task it follows, or "*"
        self.recorder = recorder
        self.ws: tornado.websocket.WebSocketClientConnection | None = None
        self.error: str | None = None
        self.count = 0
        self.id_sum = 0
        self.id_sq = 0
        self.first = 0
        self.last = 0
        self.disorder = 0  # ids not above the previous one: duplicates or out of order
        self.other = 0  # messages without an id (resync, errors)
        self.closed = False
        self.stopping = False
        self.close_code: int | None = None

    def on_message(self, raw: str | bytes | None) -> None:
        """Count one message (None: the connection closed)."""
        now = time.time()
        if raw is None:
            self.closed = True
            if not self.stopping and self.ws is not None:
                self.close_code = self.ws.close_code or -1
            return
        message = orjson.loads(raw)
        event_id = message.get("id")
        if not isinstance(event_id, int):
            self.other += 1
            return
        self.count += 1
        self.id_sum += event_id
        self.id_sq += event_id * event_id
        if event_id <= self.last:
            self.disorder += 1
        else:
            self.last = event_id
        self.first = self.first or event_id
        self.recorder.record(self.instance, event_id, message, now)

    def counts(self) -> list[Any]:
        """What the report needs of this client, as a JSON row."""
        keys = ("instance", "key", "count", "id_sum", "id_sq", "first", "last", "disorder")
        return [getattr(self, key) for key in (*keys, "other")]


@dataclass
class Recorder:
    """Latencies of one client process."""

    sample_every: int
    # "same" / "other": the writing instance is the client's own, or the other one.
    hist: dict[str, collections.Counter[int]] = field(
        default_factory=lambda: {"same": collections.Counter(), "other": collections.Counter()}
    )
    types: collections.Counter[str] = field(default_factory=collections.Counter)
    # Per receiving instance: event ids and receipt times, for commit-to-receipt latencies.
    ids: dict[int, array[int]] = field(default_factory=dict)
    times: dict[int, array[float]] = field(default_factory=dict)
    unparsed: int = 0

    def record(self, instance: int, event_id: int, message: Mapping[str, Any], now: float) -> None:
        """Count the message by type; its send-to-receipt latency; maybe its receipt time."""
        self.types[message.get("type", "?")] += 1
        if event_id % self.sample_every == 0:
            if instance not in self.ids:
                self.ids[instance], self.times[instance] = array("q"), array("d")
            self.ids[instance].append(event_id)
            self.times[instance].append(now)
        parts = str((message.get("task") or {}).get("name", "")).split()
        if len(parts) != 4 or parts[0] != "bench":
            self.unparsed += 1
            return
        kind = "same" if int(parts[3]) == instance else "other"
        self.hist[kind][max(0, int((now - float(parts[2])) / BUCKET))] += 1


async def _client(plan: Mapping[str, Any], commands: asyncio.Queue[str]) -> dict[str, Any]:
    recorder = Recorder(plan["sample_every"])
    conns = [Conn(url, instance, key, recorder) for url, instance, key in plan["connections"]]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(conn: Conn) -> None:
        async with gate:
            try:
                conn.ws = await asyncio.wait_for(
                    tornado.websocket.websocket_connect(
                        conn.url, on_message_callback=conn.on_message
                    ),
                    CONNECT_TIMEOUT,
                )
            except Exception as exc:
                conn.error = f"{type(exc).__name__}: {exc}"

    started = time.monotonic()
    await asyncio.gather(*(connect(conn) for conn in conns))
    connected = sum(conn.ws is not None for conn in conns)
    report = {"connected": connected, "seconds": time.monotonic() - started}
    print("CONNECTED " + json.dumps(report), flush=True)

    stop = json.loads(await commands.get())
    targets: dict[str, int] = stop["targets"]
    started = time.monotonic()
    deadline = started + stop["timeout"]

    def behind() -> int:
        return sum(
            1
            for conn in conns
            if conn.ws is not None and not conn.closed and conn.last < targets.get(conn.key, 0)
        )

    while time.monotonic() < deadline:
        if not behind():
            break
        await asyncio.sleep(0.05)
    waited = time.monotonic() - started
    still_behind = behind()
    for conn in conns:
        conn.stopping = True
        if conn.ws is not None and not conn.closed:
            conn.ws.close(1000)
    await asyncio.sleep(0.5)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "connect_errors": [conn.error for conn in conns if conn.error],
        "waited": waited,
        "behind_at_stop": still_behind,
        "conns": [[*c.counts(), c.close_code, c.ws is not None] for c in conns],
        "hist": {kind: dict(counts) for kind, counts in recorder.hist.items()},
        "types": dict(recorder.types),
        "unparsed": recorder.unparsed,
        "samples": {
            instance: [ids.tolist(), [round(t, 6) for t in recorder.times[instance]]]
            for instance, ids in recorder.ids.items()
        },
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


def client_main() -> int:
    """`python -m bench.ws client`: one client process (see above)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    plan = json.loads(sys.stdin.readline())

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[str] = asyncio.Queue()

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(commands.put_nowait, line)

        threading.Thread(target=read_stdin, daemon=True).start()
        return await _client(plan, commands)

    result = asyncio.run(run())
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


@dataclass
class ClientProcess:
    """A running client process, its output lines arriving on a queue."""

    proc: subprocess.Popen[bytes]
    lines: queue.Queue[str]
    log: Path

    def send(self, line: Mapping[str, Any]) -> None:
        """One JSON line to its stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(line).encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float) -> dict[str, Any]:
        """The JSON of the next line starting with prefix."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise RuntimeError(
                        f"client exited with {self.proc.returncode}:\n{tail(self.log)}"
                    ) from None
                continue
            if line.startswith(prefix + " "):
                return dict(json.loads(line[len(prefix) + 1 :]))
        raise RuntimeError(f"client printed no {prefix} within {timeout:.0f} s:\n{tail(self.log)}")


def _pump(stream: IO[bytes], lines: queue.Queue[str]) -> None:
    for raw in stream:
        lines.put(raw.decode(errors="replace"))


@contextlib.contextmanager
def client_processes(
    plans: Sequence[Mapping[str, Any]], log_dir: Path
) -> Iterator[list[ClientProcess]]:
    """Start one client process per plan; they get SIGTERM if we die first."""
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
    started: list[ClientProcess] = []
    try:
        for number, plan in enumerate(plans):
            log_path = log_dir / f"client{number}.log"
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    [*prefix, sys.executable, "-m", "bench.ws", "client"],
                    cwd=REPO_ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,
                )
            lines: queue.Queue[str] = queue.Queue()
            assert proc.stdout is not None
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            client = ClientProcess(proc, lines, log_path)
            client.send(plan)
            started.append(client)
        yield started
    finally:
        for client in started:
            if client.proc.poll() is None:
                client.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                client.proc.wait(10)
            if client.proc.poll() is None:
                client.proc.kill()
                client.proc.wait()


# --- setup ---------------------------------------------------------------------------------


def post(port: int, path: str, body: Any) -> Any:
    """POST JSON to 127.0.0.1:port, expecting 2xx; the decoded response."""
    request = urllib.request.Request(
        f"http://{LOCALHOST}:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def create_tasks(port: int) -> dict[str, list[str]]:
    """PROJECTS projects of TASKS_PER_PROJECT tasks each: {project uuid: [task uuids]}."""
    found = {}
    for number in range(PROJECTS):
        project = post(port, "/projects", {"name": f"Bench project {number}", "price": "1000"})
        items = [
            {
                "name": f"Task {number}.{index}",
                "urls": ["https://files.test/a.png"],
                "project_id": project["uuid"],
            }
            for index in range(TASKS_PER_PROJECT)
        ]
        created = post(port, "/tasks/batch_create", items)["items"]
        found[project["uuid"]] = [task["uuid"] for task in created]
    return found


def plans(
    args: argparse.Namespace, ports: Sequence[int], tasks: Mapping[str, Sequence[str]]
) -> list[dict[str, Any]]:
    """The connections of each client process: instances alternate, filters go round."""
    projects = list(tasks)
    all_tasks = [task for project in projects for task in tasks[project]]
    connections = []
    for number in range(args.clients):
        instance = number % len(ports)
        turn = number // len(ports)  # so that each key gets clients on every instance
        url = f"ws://{LOCALHOST}:{ports[instance]}/ws"
        if args.filter == "project":
            key = projects[turn % len(projects)]
            url += f"?project_id={key}"
        elif args.filter == "task":
            key = all_tasks[turn % len(all_tasks)]
            url += f"?task_id={key}"
        else:
            key = "*"
        connections.append((url, instance, key))
    per_process = -(-args.clients // args.client_processes)
    sample_every = 10 if args.filter == "none" else 1
    return [
        {"connections": connections[start : start + per_process], "sample_every": sample_every}
        for start in range(0, args.clients, per_process)
    ]


# --- the driver ----------------------------------------------------------------------------


@dataclass
class DriverStats:
    """What the driver did."""

    batches: int = 0
    updates: int = 0
    errors: list[str] = field(default_factory=list)
    late: int = 0  # starts more than 10 ms behind schedule
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0


async def drive(
    ports: Sequence[int],
    tasks: Mapping[str, Sequence[str]],
    *,
    seconds: float,
    interval: tuple[float, float],
    first: int = 0,
) -> DriverStats:
    """Rename one project's tasks per batch, every `interval` seconds, alternating instances."""
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=DRIVER_IN_FLIGHT)
    groups = list(tasks.values())
    stats = DriverStats()
    rng = random.Random(4)
    slots = asyncio.Semaphore(DRIVER_IN_FLIGHT)
    pending: set[asyncio.Task[None]] = set()

    async def batch(number: int) -> None:
        # Alternate instances, and flip the pairing every round so that each project's
        # changes go through both instances.
        writer = (number + number // len(groups)) % len(ports)
        group = groups[number % len(groups)]
        sent = time.time()
        body = [{"task_id": task, "name": f"bench {number} {sent:.6f} {writer}"} for task in group]
        try:
            response = await client.fetch(
                f"http://{LOCALHOST}:{ports[writer]}/tasks/batch_update",
                method="POST",
                body=json.dumps(body),
                headers={"Content-Type": "application/json"},
                request_timeout=30,
                raise_error=False,
            )
            if response.code != 200:
                stats.errors.append(f"{response.code}: {(response.body or b'')[:200]!r}")
            else:
                stats.updates += len(group)
        except Exception as exc:
            stats.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            stats.latencies.append(time.time() - sent)
            slots.release()

    loop = asyncio.get_running_loop()
    started = loop.time()
    next_at = started
    number = first
    end = started + seconds
    # Stop on the clock: when the servers cannot keep up, fewer batches go out, not a longer run.
    while next_at < end and loop.time() < end:
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        if loop.time() - next_at > 0.01:
            stats.late += 1
        job = asyncio.ensure_future(batch(number))
        pending.add(job)
        job.add_done_callback(pending.discard)
        number += 1
        stats.batches += 1
        next_at += rng.uniform(*interval)
    await asyncio.gather(*pending)
    stats.seconds = loop.time() - started
    client.close()
    return stats


# --- measuring -----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def scrape(port: int) -> dict[str, float]:
    """The websocket and event metrics of an instance."""
    wanted = (
        "satchel_ws_connections",
        "satchel_ws_messages_sent_total",
        "satchel_ws_clients_dropped_total",
        "satchel_event_listener_reconnects_total",
        "satchel_event_lag_seconds_sum",
        "satchel_event_lag_seconds_count",
    )
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value)
    return found


@dataclass(frozen=True)
class StoredEvent:
    """An outbox row as the benchmark needs it."""

    id: int
    type: str
    project_id: str
    task_id: str | None
    created_at: float
    writer: int | None  # the instance the driver sent the change to


def events_after(url: str, first: int) -> list[StoredEvent]:
    """The outbox rows after id `first`."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id, type, project_id::text, task_id::text,"
            " extract(epoch FROM created_at)::float8, payload->>'name'"
            " FROM event WHERE id > %s ORDER BY id",
            [first],
        ).fetchall()
    found = []
    for event_id, kind, project_id, task_id, created_at, name in rows:
        parts = (name or "").split()
        writer = int(parts[3]) if len(parts) == 4 and parts[0] == "bench" else None
        found.append(StoredEvent(event_id, kind, project_id, task_id, created_at, writer))
    return found


def last_event_id(url: str) -> int:
    """The highest event id so far."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM event").fetchone()
    return int(row[0]) if row else 0


def event_key(event: StoredEvent, filter_name: str) -> str:
    """The filter key of the clients an event goes to."""
    if filter_name == "project":
        return event.project_id
    if filter_name == "task":
        return event.task_id or ""
    return "*"


def percentile(ordered: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def hist_percentiles(counts: Mapping[int, int], shares: Sequence[float]) -> list[float]:
    """Percentiles (ms) of a histogram of BUCKET-wide buckets, each at its bucket's top."""
    total = sum(counts.values())
    found = []
    for share in shares:
        rank = max(1, math.ceil(share * total))
        seen = 0
        value = math.nan
        for bucket in sorted(counts):
            seen += counts[bucket]
            if seen >= rank:
                value = (bucket + 1) * BUCKET * 1000
                break
        found.append(value)
    return found


@dataclass
class Delivery:
    """Every client's messages against what its filter selects."""

    clients: int = 0
    complete: int = 0
    received: int = 0
    expected: int = 0
    missing: int = 0
    extra: int = 0
    disorder: int = 0
    closed: collections.Counter[int] = field(default_factory=collections.Counter)
    other_messages: int = 0
    not_connected: int = 0
    examples: list[str] = field(default_factory=list)


def check_delivery(
    results: Sequence[Mapping[str, Any]], events: Sequence[StoredEvent], filter_name: str
) -> Delivery:
    """Compare each client's count, id sum and id square sum with its filter's events."""
    expected: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for event in events:
        sums = expected[event_key(event, filter_name)]
        sums[0] += 1
        sums[1] += event.id
        sums[2] += event.id * event.id
    found = Delivery()
    for result in results:
        for row in result["conns"]:
            _instance, key, count, id_sum, id_sq, _first, _last, disorder, other = row[:9]
            close_code, connected = row[9], row[10]
            found.clients += 1
            if not connected:
                found.not_connected += 1
                continue
            want = expected[key]
            found.received += count
            found.expected += want[0]
            found.missing += max(0, want[0] - count)
            found.extra += max(0, count - want[0])
            found.disorder += disorder
            found.other_messages += other
            if close_code is not None:
                found.closed[close_code] += 1
            exact = [count, id_sum, id_sq] == want and not disorder and close_code is None
            found.complete += exact
            if not exact and len(found.examples) < 3:
                found.examples.append(
                    f"client of {key} on {INSTANCES[row[0]]}: {count} of {want[0]} messages,"
                    f" {disorder} out of order, close code {close_code}"
                )
    return found


@dataclass(frozen=True)
class Latencies:
    """Commit-to-receipt latencies (ms), sorted: all, and by whether the writer was the
    receiving client's own instance."""

    all: list[float]
    same: list[float]
    other: list[float]


def commit_latencies(
    results: Sequence[Mapping[str, Any]], events: Sequence[StoredEvent]
) -> Latencies:
    """Receipt time minus the event row's created_at, for every recorded receipt."""
    by_id = {event.id: event for event in events}
    split: dict[bool, list[float]] = {True: [], False: []}
    for result in results:
        for instance, (ids, times) in result["samples"].items():
            for event_id, received in zip(ids, times, strict=True):
                event = by_id.get(event_id)
                if event is not None:
                    split[event.writer == int(instance)].append(
                        (received - event.created_at) * 1000
                    )
    return Latencies(sorted(split[True] + split[False]), sorted(split[True]), sorted(split[False]))


# --- profiling -----------------------------------------------------------------------------


def find_py_spy() -> str | None:
    """py-spy from PATH or from the running interpreter's environment."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy recording `pid` for `seconds` in the background (collapsed stacks to out)."""
    py_spy = find_py_spy()
    if py_spy is None:
        print("profile skipped: py-spy is not installed (pip install py-spy)")
        return None
    cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250"]
    cmd += ["--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def print_profile(lines: Sequence[str], title: str, top: int = 25) -> None:
    """Self and inclusive shares of the busiest functions, from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";") if not frame.startswith("thread")]
        frames = frames or ["<no Python frame>"]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        print(f"\n{title}: no samples")
        return
    print(f"\n{title} ({total} samples):")
    # The event loop and the entry point hold every sample; they say nothing.
    for frame in list(inclusive):
        if frame.endswith(("(satchel)", "(server/main.py)")) or (
            "(asyncio/" in frame and not frame.startswith("Handle._run")
        ):
            del inclusive[frame]
    for heading, counter in (("self", own), ("inclusive", inclusive)):
        print(f"  top {top} by {heading} time:")
        for frame, count in counter.most_common(top):
            print(f"    {count / total:>6.1%}  {frame}")


def _function(frame: str) -> str:
    """'name (path/to/file.py:123)' -> 'name (dir/file.py)': lines of one function add up."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(path).parts[-2:]) if path else "?"
    return f"{name} ({short})"


# --- reporting -----------------------------------------------------------------------------


def _ms(values: Sequence[float], share: float) -> str:
    value = percentile(values, share)
    return f"{value:8.1f}" if not math.isnan(value) else f"{'-':>8}"


def _latency_row(label: str, ordered: Sequence[float]) -> str:
    cells = "".join(_ms(ordered, share) for share in (0.5, 0.9, 0.99, 0.999, 1.0))
    return f"  {label:<44} {len(ordered):>9} {cells}"


def _hist_row(label: str, counts: Mapping[int, int]) -> str:
    values = hist_percentiles(counts, (0.5, 0.9, 0.99, 0.999, 1.0))
    cells = "".join(f"{v:8.1f}" if not math.isnan(v) else f"{'-':>8}" for v in values)
    return f"  {label:<44} {sum(counts.values()):>9} {cells}"


def _merge_hist(results: Sequence[Mapping[str, Any]], kinds: Sequence[str]) -> dict[int, int]:
    merged: collections.Counter[int] = collections.Counter()
    for result in results:
        for kind in kinds:
            merged.update({int(k): v for k, v in result["hist"][kind].items()})
    return dict(merged)


@dataclass
class Run:
    """Everything one run measured, for the report and --json."""

    args: argparse.Namespace
    info: dict[str, Any]
    ports: list[int]
    pids: list[int]
    connect: list[dict[str, Any]]
    connections: list[int]  # per instance, from the servers' gauge
    rss_before: list[int]
    rss_connected: list[int]
    rss_after: list[int]
    driver: DriverStats
    cpu: dict[str, float]
    cpu_seconds: dict[str, float]  # from the start of the load until every client is done
    metrics_before: list[dict[str, float]]
    metrics_after: list[dict[str, float]]
    events: int
    delivery: Delivery
    latency: Latencies
    results: list[dict[str, Any]]
    waited: float


def report(run: Run) -> list[tuple[str, str, str, bool | None]]:
    """Print the figures; returns the goal rows (name, measured, goal, met or None)."""
    driver, delivery, latency = run.driver, run.delivery, run.latency
    driver_ms = sorted(v * 1000 for v in driver.latencies)
    args = run.args
    nominal = TASKS_PER_PROJECT * 2 / (args.min_interval + args.max_interval)
    changes = driver.updates / driver.seconds
    per_event = {
        "project": args.clients / PROJECTS,
        "task": args.clients / (PROJECTS * TASKS_PER_PROJECT),
    }
    nominal_messages = nominal * per_event.get(args.filter, args.clients)
    print(
        f"driver: {driver.batches} batches of {TASKS_PER_PROJECT} in {driver.seconds:.1f} s"
        f" ({changes:.1f} task updates/s of {nominal:.0f} scheduled), {len(driver.errors)} errors,"
        f" {driver.late} late starts; batch_update round trip p50 {_ms(driver_ms, 0.5).strip()}"
        f" ms, p99 {_ms(driver_ms, 0.99).strip()} ms"
    )
    print(
        f"events committed: {run.events}; clients reached their last expected id"
        f" {run.waited:.2f} s after the last batch answered"
    )
    rate = delivery.received / driver.seconds
    expected = delivery.expected / driver.seconds
    print(
        f"delivered: {delivery.received} messages of {delivery.expected} expected ="
        f" {rate:,.0f} messages/s (expected {expected:,.0f}/s)"
    )
    types: collections.Counter[str] = collections.Counter()
    for result in run.results:
        types.update(result["types"])
    print("message types: " + ", ".join(f"{name} {n}" for name, n in types.most_common()))
    dropped = [
        after.get("satchel_ws_clients_dropped_total", 0)
        - before.get("satchel_ws_clients_dropped_total", 0)
        for before, after in zip(run.metrics_before, run.metrics_after, strict=True)
    ]
    sent = [
        after.get("satchel_ws_messages_sent_total", 0)
        - before.get("satchel_ws_messages_sent_total", 0)
        for before, after in zip(run.metrics_before, run.metrics_after, strict=True)
    ]
    lags = []
    for before, after in zip(run.metrics_before, run.metrics_after, strict=True):
        count = after.get("satchel_event_lag_seconds_count", 0) - before.get(
            "satchel_event_lag_seconds_count", 0
        )
        total = after.get("satchel_event_lag_seconds_sum", 0) - before.get(
            "satchel_event_lag_seconds_sum", 0
        )
        lags.append(total / count * 1000 if count else math.nan)
    print(
        "server side: "
        + "; ".join(
            f"{name} sent {int(n)} messages, dropped {int(d)} slow clients,"
            f" event lag commit -> feed mean {lag:.1f} ms"
            for name, n, d, lag in zip(INSTANCES, sent, dropped, lags, strict=True)
        )
    )
    print(f"\n  {'latency, ms':<44} {'n':>9} {'p50':>8}{'p90':>8}{'p99':>8}{'p99.9':>8}{'max':>8}")
    print(_latency_row("commit -> receipt, all", latency.all))
    print(_latency_row("  written through the client's instance", latency.same))
    print(_latency_row("  written through the other instance", latency.other))
    print(
        _hist_row(
            "driver send -> receipt (all messages)", _merge_hist(run.results, ("same", "other"))
        )
    )

    print("\nmemory (VmRSS):")
    per_connection = []
    for index, name in enumerate(INSTANCES):
        base, connected, end = run.rss_before[index], run.rss_connected[index], run.rss_after[index]
        count = max(1, run.connections[index])
        per_connection.append((connected - base) / count)
        print(
            f"  {name}: {base / 1024:.1f} MiB before, {connected / 1024:.1f} MiB with"
            f" {run.connections[index]} connections (+{(connected - base) / count:.1f} KiB"
            f" each), {end / 1024:.1f} MiB after the load"
        )
    print(
        "CPU during the load (cores; 1.0 = one core busy): "
        + ", ".join(f"{name} {value:.2f}" for name, value in run.cpu.items())
    )
    received = [sum(row[2] for row in result["conns"]) for result in run.results]
    costs = [(name, run.cpu_seconds[name], n) for name, n in zip(INSTANCES, sent, strict=True)]
    costs += [(f"client{i}", run.cpu_seconds[f"client{i}"], n) for i, n in enumerate(received)]
    print(
        "CPU per message (load and drain): "
        + ", ".join(f"{name} {spent / n * 1e6:.0f} us" for name, spent, n in costs if n)
    )

    closed = sum(delivery.closed.values())
    missing_open = delivery.missing if not closed else None
    per_kib = sum(per_connection) / len(per_connection)
    p99 = percentile(latency.all, 0.99)
    goals: list[tuple[str, str, str, bool | None]] = [
        (
            "p99 commit -> receipt",
            f"{p99:.1f} ms",
            f"<= {GOAL_P99_MS:.0f} ms",
            p99 <= GOAL_P99_MS,
        ),
        ("p50 commit -> receipt", f"{percentile(latency.all, 0.5):.1f} ms", "(reported)", None),
        (
            "clients with exactly their events",
            f"{delivery.complete} of {delivery.clients}",
            "all",
            delivery.complete == delivery.clients,
        ),
        (
            "messages missing / extra",
            f"{delivery.missing} / {delivery.extra}",
            "0 / 0",
            not delivery.missing and not delivery.extra,
        ),
        ("ids out of order or repeated", str(delivery.disorder), "0", not delivery.disorder),
        (
            "closes 1013 (too slow) / other",
            f"{delivery.closed.get(1013, 0)} / {closed - delivery.closed.get(1013, 0)}",
            "0 / 0",
            not closed,
        ),
        (
            "coalesced (missing on open clients)",
            str(missing_open) if missing_open is not None else "n/a",
            "0",
            None if missing_open is None else missing_open == 0,
        ),
        (
            "task changes/s driven (100 tasks)",
            f"{changes:.1f}",
            f"{nominal:.0f} scheduled",
            changes >= 0.9 * nominal,
        ),
        ("messages/s delivered", f"{rate:,.0f}", f"{nominal_messages:,.0f} scheduled", None),
        ("server memory per connection", f"{per_kib:.1f} KiB", "(reported)", None),
    ]
    print(f"\n  {'goal':<38} {'measured':>16}  {'target':<18} result")
    for name, measured, goal, met in goals:
        verdict = "-" if met is None else ("met" if met else "MISSED")
        print(f"  {name:<38} {measured:>16}  {goal:<18} {verdict}")
    if delivery.examples:
        print("  e.g. " + "\n  e.g. ".join(delivery.examples))
    if driver.errors:
        print("  driver errors, e.g. " + "; ".join(driver.errors[:3]))
    return goals


# --- the run -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.ws", description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--filter", choices=("project", "task", "none"), default="project")
    parser.add_argument("--seconds", type=float, default=30.0, help="of changes, after connecting")
    parser.add_argument("--min-interval", type=float, default=0.020, help="between batches, s")
    parser.add_argument("--max-interval", type=float, default=0.050, help="between batches, s")
    parser.add_argument("--settle", type=float, default=2.0, help="s between connecting and RSS")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS", help="py-spy A")
    parser.add_argument("--profile-out", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def cpu_snapshot(pids: Mapping[str, int], postgres_port: int) -> dict[str, float]:
    """CPU seconds so far of each named process, of PostgreSQL, this process, the machine."""
    found = {"wall": time.monotonic()}
    for name, pid in pids.items():
        found[name] = CpuMeter(pid, None).snapshot()[1]
    _, _, found["postgres"], found["driver"], found["machine"] = CpuMeter(
        os.getpid(), postgres_port
    ).snapshot()
    return found


def cpu_use(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Cores used between two snapshots, with `other` for the rest of the machine."""
    wall = after["wall"] - before["wall"]
    used = {name: (after[name] - before[name]) / wall for name in before if name != "wall"}
    machine_total = used.pop("machine")
    used["other"] = max(0.0, machine_total - sum(used.values()))
    return used


def run(args: argparse.Namespace, workdir: Path) -> int:
    """Services up, measure, services down; returns the exit code."""
    info = machine()
    print(" ".join(f"{key}={value}" for key, value in info.items()), flush=True)
    with services(workdir) as found:
        url = found.database_url
        if not found.local:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
                conn.execute(f"CREATE SCHEMA {SCHEMA}")
            url = with_search_path(url, SCHEMA)
        try:
            migrate(url)
            return _measure(args, workdir, url, found.s3_endpoint_url, info)
        finally:
            if not found.local:
                with psycopg.connect(found.database_url, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


def _measure(
    args: argparse.Namespace, workdir: Path, url: str, s3: str | None, info: dict[str, Any]
) -> int:
    env = server_env(url, s3)
    command = satchel_command()
    ready = "/projects?limit=1"
    with (
        running("satchel-A", command, env=env, ready_path=ready, workdir=workdir) as a,
        running("satchel-B", command, env=env, ready_path=ready, workdir=workdir) as b,
    ):
        return _measure_with(args, workdir, url, [a, b], info)


def _measure_with(
    args: argparse.Namespace,
    workdir: Path,
    url: str,
    servers: list[Server],
    info: dict[str, Any],
) -> int:
    ports = [server.port for server in servers]
    pids = [server.proc.pid for server in servers]
    tasks = create_tasks(ports[0])
    interval = (args.min_interval, args.max_interval)
    print(
        f"instances: A :{ports[0]}, B :{ports[1]}; {PROJECTS} projects x {TASKS_PER_PROJECT}"
        f" tasks; clients: {args.clients} in {args.client_processes} processes, half on each"
        f" instance, filter: {args.filter}",
        flush=True,
    )
    # Warm both instances' write and fan-out paths before the baseline.
    warm = asyncio.run(drive(ports, tasks, seconds=1.0, interval=interval))
    if warm.errors:
        print(f"warm-up batches failed: {warm.errors[:3]}")
        return 1
    time.sleep(1.0)
    start_id = last_event_id(url)
    rss_before = [rss_kib(pid) for pid in pids]
    metrics_before = [scrape(port) for port in ports]
    with client_processes(plans(args, ports, tasks), workdir) as clients:
        connect = [client.expect("CONNECTED", CONNECT_TIMEOUT * 4) for client in clients]
        time.sleep(args.settle)
        connections = [int(scrape(port).get("satchel_ws_connections", 0)) for port in ports]
        rss_connected = [rss_kib(pid) for pid in pids]
        seconds = sum(c["seconds"] for c in connect) / len(connect)
        print(
            f"connected {sum(c['connected'] for c in connect)} of {args.clients} clients in"
            f" about {seconds:.1f} s; the servers count {connections[0]} + {connections[1]}",
            flush=True,
        )
        names = {"A": pids[0], "B": pids[1]}
        names |= {f"client{n}": c.proc.pid for n, c in enumerate(clients)}
        postgres_port = urlsplit(url).port or 5432
        before = cpu_snapshot(names, postgres_port)
        out = args.profile_out or workdir / "profile.txt"
        profiler = start_profile(pids[0], args.profile, out) if args.profile > 0 else None
        driver = asyncio.run(
            drive(ports, tasks, seconds=args.seconds, interval=interval, first=1_000_000)
        )
        during = cpu_snapshot(names, postgres_port)
        events = events_after(url, start_id)
        targets: dict[str, int] = {}
        for event in events:
            targets[event_key(event, args.filter)] = event.id
        for client in clients:
            client.send({"targets": targets, "timeout": DRAIN_TIMEOUT})
        results = [client.expect("RESULT", DRAIN_TIMEOUT + 120) for client in clients]
        drained = cpu_snapshot(names, postgres_port)
        if profiler is not None:
            profiler.wait(args.profile + 60)
    rss_after = [rss_kib(pid) for pid in pids]
    metrics_after = [scrape(port) for port in ports]
    delivery = check_delivery(results, events, args.filter)
    measured = Run(
        args=args,
        info=info,
        ports=ports,
        pids=pids,
        connect=connect,
        connections=connections,
        rss_before=rss_before,
        rss_connected=rss_connected,
        rss_after=rss_after,
        driver=driver,
        cpu=cpu_use(before, during),
        cpu_seconds={name: drained[name] - before[name] for name in names},
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        events=len(events),
        delivery=delivery,
        latency=commit_latencies(results, events),
        results=results,
        waited=max(result["waited"] for result in results),
    )
    goals = report(measured)
    connect_errors = [e for result in results for e in result["connect_errors"]]
    if connect_errors:
        print(f"  connection failures: {len(connect_errors)}, e.g. {connect_errors[0]}")
    if profiler is not None and out.exists():
        title = f"profile of instance A during the load ({args.profile:g} s)"
        print_profile(out.read_text().splitlines(), title)
    print(f"load average after the run: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    if args.json:
        write_json(args.json, measured, goals)
    # Missing the latency goal or the change rate is a finding; wrong delivery is a failure.
    performance = ("p99", "task changes")
    correct = all(met is not False for name, _, _, met in goals if not name.startswith(performance))
    return 0 if correct and not driver.errors and not connect_errors else 1


def write_json(path: Path, run: Run, goals: Sequence[tuple[str, str, str, bool | None]]) -> None:
    """The figures of the run, without the raw samples."""
    record = {
        "machine": run.info,
        "options": {k: str(v) for k, v in vars(run.args).items()},
        "goals": [{"name": n, "measured": m, "goal": g, "met": ok} for n, m, g, ok in goals],
        "latency_ms": {
            name: {f"p{q:g}": percentile(values, q / 100) for q in (50, 90, 99, 99.9, 100)}
            for name, values in vars(run.latency).items()
        },
        "rss_kib": {
            "before": run.rss_before,
            "connected": run.rss_connected,
            "after": run.rss_after,
        },
        "connections": run.connections,
        "cpu_cores": run.cpu,
        "driver": {
            "batches": run.driver.batches,
            "updates": run.driver.updates,
            "errors": run.driver.errors[:20],
            "late": run.driver.late,
            "seconds": run.driver.seconds,
        },
        "delivery": {
            **{k: v for k, v in vars(run.delivery).items() if k != "closed"},
            "closed": dict(run.delivery.closed),
        },
        "events": run.events,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.ws`; `python -m bench.ws client` is one client process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        return client_main()
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="satchel-bench-ws-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
