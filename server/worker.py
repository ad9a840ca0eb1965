"""The archive worker: a child process that forms an instance's archives, next to its API.

Every archive byte is downloaded, zipped, hashed and uploaded by Python code. Done on the API's
event loop, that work holds the loop and the GIL while requests wait, and on a small machine it
also takes the CPU they need. So `satchel serve` starts `satchel work` as a child process
(`ARCHIVE_WORKER=process`, the default) at a lower CPU priority (`ARCHIVE_WORKER_NICE`), and
the API's process keeps only the requests, the websockets and the event feed. The two share
nothing but PostgreSQL, which already coordinates every instance: the queue, the run locks and
the events. The child is one `Runner` with its own loop and pools, zipping in its own threads.

The parent keeps the child alive (it starts it again, with a growing pause, if it ends unasked),
stops it with SIGTERM (the child drains like an instance would), and asks it for its metrics
over a socket pair, so `/metrics` of the instance shows both processes. The child dies with its
parent (PR_SET_PDEATHSIG): an instance killed outright leaves no archive runs behind, and its
run locks vanish with the child's connections, so another instance takes the tasks over.

`satchel work` also runs on its own, for a deployment that separates API and worker instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from prometheus_client import generate_latest

from server.config import Settings
from server.metrics import ARCHIVE_METRICS, Metrics

log = logging.getLogger("satchel.worker")
# The child's side of the socket pair, its settings, and the parent it must die with.
CONTROL_ENV = "SATCHEL_WORKER_FD"
SETTINGS_ENV = "SATCHEL_WORKER_SETTINGS"
PARENT_ENV = "SATCHEL_WORKER_PARENT"
# Pauses before starting a child that ended unasked: doubling, reset after a long life.
RESTART_MIN = 1.0
RESTART_MAX = 30.0
RESTART_RESET = 60.0
# After its drain a child still aborts uploads and closes pools; then it is killed.
STOP_GRACE = 10.0
# A child too busy to report its metrics in this time is left out of that scrape.
ASK_TIMEOUT = 2.0
_HEADER = 16  # request number, then body length: 8 bytes each, big-endian
PR_SET_PDEATHSIG = 1


def encode_settings(settings: Settings) -> str:
    """The settings as JSON, for the child's environment."""
    return json.dumps(dataclasses.asdict(settings))


def decode_settings(text: str) -> Settings:
    """Settings from `encode_settings`."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    raw = json.loads(text)
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields
    }
    return Settings(**values)


class WorkerProcess:
    """The parent's handle on its archive worker: start, keep alive, ask, stop."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._asked = 0
        self._ask = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        metrics.worker_up.set_function(lambda: float(self._writer is not None))

    def start(self) -> None:
        """Start the child, and keep it running until `stop()`."""
        self._task = asyncio.ensure_future(self._supervise())

    async def stop(self, drain_timeout: float) -> None:
        """SIGTERM the child (it drains for `drain_timeout`), kill it if it outlives that."""
        self._stopping.set()
        self._signal(signal.SIGTERM)
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_timeout + STOP_GRACE)
        except TimeoutError:
            log.warning("the archive worker outlived its drain; killing it")
            self._signal(signal.SIGKILL)
            await self._task

    async def metrics_text(self) -> bytes:
        """The child's metrics in the text format, or nothing when it cannot answer now."""
        async with self._ask:
            if self._reader is None or self._writer is None:
                return b""
            self._asked += 1
            try:
                self._writer.write(b"metrics %d\n" % self._asked)
                await self._writer.drain()
                while True:
                    header = await asyncio.wait_for(self._reader.readexactly(_HEADER), ASK_TIMEOUT)
                    number, size = int.from_bytes(header[:8]), int.from_bytes(header[8:])
                    body = await asyncio.wait_for(self._reader.readexactly(size), ASK_TIMEOUT)
                    if number == self._asked:  # else the late answer to an earlier scrape
                        return body
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.warning("the archive worker did not report its metrics: %r", exc)
                return b""

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        pause = RESTART_MIN
        while not self._stopping.is_set():
            started = loop.time()
            try:
                await self._spawn()
            except OSError:
                log.exception("cannot start the archive worker")
            else:
                assert self.proc is not None
                if self._stopping.is_set():
                    self._signal(signal.SIGTERM)
                code = await self.proc.wait()
                self._disconnect()
                if self._stopping.is_set():
                    log.info("archive worker stopped", extra={"exit_code": code})
                    return
                log.error("the archive worker ended unasked", extra={"exit_code": code})
                self.metrics.worker_restarts.inc()
            if loop.time() - started > RESTART_RESET:
                pause = RESTART_MIN
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)
            pause = min(pause * 2, RESTART_MAX)

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            env = {
                **os.environ,
                CONTROL_ENV: str(theirs.fileno()),
                SETTINGS_ENV: encode_settings(self.settings),
                PARENT_ENV: str(os.getpid()),
            }
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "server.main",
                    "work",
                    pass_fds=(theirs.fileno(),),
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                )
            except BaseException:
                ours.close()
                raise
        self.starts += 1
        self._reader, self._writer = await asyncio.open_connection(sock=ours)
        log.info("archive worker started", extra={"pid": self.proc.pid})

    def _disconnect(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


# --- the child's side -----------------------------------------------------------------------


def become_child(settings: Settings) -> None:
    """As the child of `satchel serve`: get SIGKILL when it dies, and lower the CPU priority.

    Before any thread starts: a thread's priority is its own, inherited by threads it starts.
    """
    lower_priority(settings.archive_worker_nice)
    parent = int(os.environ.get(PARENT_ENV, "0") or 0)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("cannot ask to die with the parent: errno %d", ctypes.get_errno())
    if parent and os.getppid() != parent:
        os._exit(1)  # the parent died before the request above took effect


def lower_priority(nice: int) -> None:
    """Run at `nice` below the API, also where Linux schedules by session (autogroups).

    With autogroups (the default on desktop and many server kernels) CPU time is shared between
    sessions first, and a nice value only counts within its session: in the API's session, the
    worker's CPU use would count against the API whenever other sessions (PostgreSQL, other
    services) want the CPU too. So the worker gets a session, and that session the nice value.
    Under a cgroup manager (systemd) the session's group does not apply; the nice value does.
    """
    os.nice(nice)
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        os.setsid()  # signals from the parent still come: it forwards SIGTERM, and PDEATHSIG
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as group:
        group.write(str(nice))


async def work(settings: Settings) -> None:
    """Form archives until SIGTERM (or, as a child, until the parent goes away)."""
    # Imported here: the API's process never needs the archive machinery's modules.
    from server.main import archive_runner, settle_heap, storage, wants_run
    from storage.feed import EventFeed

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    control_fd = os.environ.get(CONTROL_ENV)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    if control_fd is None:
        loop.add_signal_handler(signal.SIGINT, stopping.set)
    else:
        # Ctrl-C reaches the whole process group; the parent decides when the child stops.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    metrics = Metrics()
    metrics.keep(*ARCHIVE_METRICS)
    async with contextlib.AsyncExitStack() as stack:
        # A run uses one pooled connection at a time; the claim loop and aborts one more.
        pool_max = 2 * settings.job_concurrency + 2
        db, objects = await stack.enter_async_context(storage(settings, pool_max=pool_max))
        feed = EventFeed(db, retention=settings.event_retention)
        runner = archive_runner(settings, db, objects, metrics)
        feed.subscribers.add(lambda event: runner.wake() if wants_run(event) else None)
        feed.start()
        stack.push_async_callback(feed.stop)
        runner.start()
        stack.push_async_callback(runner.stop, settings.drain_timeout)
        if control_fd is not None:
            answering = asyncio.ensure_future(_answer(int(control_fd), metrics, stopping))
            stack.callback(answering.cancel)
        settle_heap()
        log.info("archive worker running", extra={"concurrency": settings.job_concurrency})
        await stopping.wait()
        log.info("archive worker stopping")


async def _answer(fd: int, metrics: Metrics, stopping: asyncio.Event) -> None:
    """Answer the parent's requests; its end closing means it is gone: stop."""
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    try:
        while line := await reader.readline():
            command, _, number = line.decode().partition(" ")
            if command == "metrics":
                body = generate_latest(metrics.registry)
                header = int(number).to_bytes(8) + len(body).to_bytes(8)
                writer.write(header + body)
                await writer.drain()
    except (OSError, ValueError) as exc:
        log.warning("the control connection to the parent failed: %r", exc)
    finally:
        writer.close()
    stopping.set()
