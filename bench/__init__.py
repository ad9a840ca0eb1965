"""Satchel's benchmarks and the plumbing they share.

`python -m bench [NAME ...]` runs the named benchmarks (default: every one present). A
benchmark is a module `bench.NAME` with `main(argv) -> int`; adding one means adding its name
to BENCHMARKS. The helpers below start the local services, the servers under test (each a
separate single process on loopback) and the load generator, so that every benchmark measures
the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# In the order `python -m bench` runs them; names without a module yet are skipped.
BENCHMARKS = ("api", "archive", "ws")
REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
# A cold `satchel serve` imports boto and friends; a slow disk makes that take a while.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
# apt-get on a slow mirror; past this the Python client is used instead.
INSTALL_TIMEOUT = 300.0


def available() -> list[str]:
    """The benchmarks that have a module in this checkout."""
    return [name for name in BENCHMARKS if importlib.util.find_spec(f"bench.{name}") is not None]


# --- local services ----------------------------------------------------------------------


@dataclass(frozen=True)
class Services:
    """Where PostgreSQL and S3 are for this run; `local` when this run started them."""

    database_url: str
    s3_endpoint_url: str | None
    local: bool


@contextlib.contextmanager
def services(workdir: Path) -> Iterator[Services]:
    """The DATABASE_URL (and S3_ENDPOINT_URL) of the environment, or local throwaway ones."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        yield Services(url, os.environ.get("S3_ENDPOINT_URL", "").strip() or None, local=False)
        return
    from server.devenv import local_services  # only when we start them: it imports psycopg

    # The postgres user must be able to enter the directory holding its cluster.
    workdir.chmod(0o755)
    with local_services(workdir, durable=False) as found:
        yield Services(found.database_url, found.s3_endpoint_url, local=True)


def with_search_path(url: str, schema: str) -> str:
    """url with every session's search_path set to schema, to keep a shared database clean."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def spawn(cmd: Sequence[str], *, env: Mapping[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start cmd in its own session, output to log; it gets SIGTERM if we die first."""
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
    return subprocess.Popen(
        [*prefix, *cmd],
        env=dict(env),
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM proc, and SIGKILL it when it outlives STOP_TIMEOUT."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(port: int, path: str, *, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One GET to 127.0.0.1:port: status, headers (lower-case names) and body."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


def wait_until_ok(port: int, path: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until GET path on port answers 200 (a 503 means the database is not up yet)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if get(port, path, timeout=2)[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"no 200 from :{port}{path} within {START_TIMEOUT:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    """The last lines of a log file."""
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


@dataclass
class Server:
    """A server under test: its process, port and log."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


def satchel_command() -> list[str]:
    """`satchel serve`, from the running interpreter's environment when it is there."""
    script = Path(sys.executable).parent / "satchel"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "server.main", "serve"]


@contextlib.contextmanager
def running(
    name: str, cmd: Sequence[str], *, env: Mapping[str, str], ready_path: str, workdir: Path
) -> Iterator[Server]:
    """Run a server (told its port through PORT) until ready_path answers 200; stop it after."""
    port = free_port()
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        proc = spawn(cmd, env={**env, "HOST": LOCALHOST, "PORT": str(port)}, log=log)
        try:
            wait_until_ok(port, ready_path, proc, log_path)
            yield Server(name, proc, port, log_path)
        finally:
            stop(proc)


# --- CPU accounting ------------------------------------------------------------------------
# On a small machine the server, PostgreSQL and the load generator share the cores, and other
# work on the machine skews the figures: every measurement says who used the CPU meanwhile.

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, int, float] | None:
    """A process's command name, parent pid and CPU seconds (user + system) so far."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _postgres_cpu(port: int) -> float:
    """CPU seconds of the local postmaster listening on port and of its children so far."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (found := _stat(int(entry.name))) is not None:
            procs[int(entry.name)] = found
    total = 0.0
    for pid, (comm, _, _) in procs.items():
        if comm != "postgres":
            continue
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"-p" in args and args[args.index(b"-p") + 1 :][:1] == [str(port).encode()]:
                total += procs[pid][2] + sum(c for _, ppid, c in procs.values() if ppid == pid)
    return total


def _machine_busy() -> float:
    """CPU seconds all cores spent on anything but idling, since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / _TICK


def _own_cpu() -> float:
    """CPU seconds of this process and its finished children (wrk runs, once reaped)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class CpuUse:
    """Cores used during a measurement, by whom; 1.0 is one core busy all the time."""

    server: float
    postgres: float
    load: float
    other: float


class CpuMeter:
    """Snapshots of CPU counters around a measurement (Linux /proc)."""

    def __init__(self, server_pid: int, postgres_port: int | None) -> None:
        self.server_pid = server_pid
        self.postgres_port = postgres_port

    def snapshot(self) -> tuple[float, ...]:
        """The counters now."""
        server = _stat(self.server_pid)
        postgres = _postgres_cpu(self.postgres_port) if self.postgres_port else 0.0
        return (
            time.monotonic(),
            server[2] if server else 0.0,
            postgres,
            _own_cpu(),
            _machine_busy(),
        )

    @staticmethod
    def use(before: tuple[float, ...], after: tuple[float, ...]) -> CpuUse:
        """The cores used between two snapshots."""
        wall, server, postgres, load, machine = (b - a for a, b in zip(before, after, strict=True))
        return CpuUse(
            server=server / wall,
            postgres=postgres / wall,
            load=load / wall,
            other=max(0.0, machine - server - postgres - load) / wall,
        )


# --- load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """The shape of the load: the same for every target of a run."""

    connections: int = 32
    threads: int = 1
    seconds: float = 10.0


@dataclass(frozen=True)
class Result:
    """What one load run measured."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and responses that are not 2xx/3xx

    @property
    def rps(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0


# wrk prints its own summary; this adds one machine-readable line with exact figures.
_WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "p50_us": %.1f, "p99_us": %.1f,'
    .. ' "errors": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def find_wrk(*, install: bool) -> str | None:
    """The wrk binary; installed from Debian's packages when missing and we are root."""
    found = shutil.which("wrk")
    if found or not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("wrk is missing; installing it with apt-get", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        try:
            subprocess.run(cmd, env=env, check=True, timeout=INSTALL_TIMEOUT, capture_output=True)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"{' '.join(cmd)} failed: {exc}", file=sys.stderr)
            return None
    return shutil.which("wrk")


class LoadGenerator:
    """wrk when there is one, otherwise an asyncio client (slower: it may be the bottleneck)."""

    def __init__(self, wrk: str | None, load: Load, workdir: Path) -> None:
        self.wrk = wrk
        self.load = load
        self.script = workdir / "report.lua"
        self.script.write_text(_WRK_SCRIPT)

    @property
    def name(self) -> str:
        """How the load is made, for reports."""
        load = self.load
        if self.wrk:
            return f"wrk -t{load.threads} -c{load.connections} -d{load.seconds:g}s --latency"
        return f"python asyncio client, {load.connections} connections, {load.seconds:g} s"

    def run(self, port: int, path: str, seconds: float | None = None) -> Result:
        """Load GET path on 127.0.0.1:port for the configured (or given) time."""
        seconds = self.load.seconds if seconds is None else seconds
        if self.wrk:
            return self._wrk(port, path, seconds)
        return asyncio.run(python_load(port, path, self.load.connections, seconds))

    def _wrk(self, port: int, path: str, seconds: float) -> Result:
        load = self.load
        cmd = [self.wrk or "wrk", f"-t{load.threads}", f"-c{load.connections}"]
        cmd += [f"-d{max(1, round(seconds))}s", "--latency", "-s", str(self.script)]
        cmd.append(f"http://{LOCALHOST}:{port}{path}")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
        for line in out.stdout.splitlines():
            if line.startswith("BENCH_RESULT "):
                data: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
                return Result(
                    requests=data["requests"],
                    seconds=data["duration_us"] / 1e6,
                    p50_ms=data["p50_us"] / 1000,
                    p99_ms=data["p99_us"] / 1000,
                    errors=data["errors"],
                )
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")


async def python_load(port: int, path: str, connections: int, seconds: float) -> Result:
    """Keep-alive GETs of path from `connections` concurrent HTTP/1.1 clients for `seconds`."""
    request = f"GET {path} HTTP/1.1\r\nHost: {LOCALHOST}:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(LOCALHOST, port)
        try:
            while loop.time() < deadline:
                sent = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(_content_length(head))
                latencies.append(time.perf_counter() - sent)
                errors += head[9:10] not in (b"2", b"3")
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    elapsed = loop.time() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Result(len(latencies), elapsed, cuts[49] * 1000, cuts[98] * 1000, errors)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("response without Content-Length")
