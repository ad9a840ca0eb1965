"""Local PostgreSQL and S3 (moto) for `make run`, `make test` and the test suite.

`local_services()` runs both for the length of a `with` block. `python -m server.devenv run
[-- CMD...]` starts whichever of them the environment does not already name, runs
`satchel migrate` and `satchel serve` (or CMD) in the foreground, and stops everything it
started when the command ends or the launcher gets SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import psycopg
from psycopg import sql

LOG = logging.getLogger("satchel.devenv")

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_BINDIR = Path(os.environ.get("PG_BINDIR", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"
DATABASE = "satchel"
DEFAULT_BUCKET = "satchel-archives"
LOCALHOST = "127.0.0.1"
# Stable ports for `make run`, so a psql session or client config survives a restart; high
# and off the usual 5432/9000 so that they rarely meet a system service.
RUN_PG_PORT = 54329
RUN_S3_PORT = 54330
# sun_path holds 108 bytes; past that PostgreSQL cannot create its Unix socket.
MAX_SOCKET_PATH = 107
# A cold start of moto imports a few hundred modules; a slow disk makes that take a while.
START_TIMEOUT = 60.0
# `satchel serve` drains archive jobs for DRAIN_TIMEOUT (25 s by default) after SIGTERM.
CHILD_STOP_TIMEOUT = 30.0
MOTO_STOP_TIMEOUT = 10.0
# A killed postmaster's children take a moment to notice and release shared memory.
PG_START_ATTEMPTS = 3


@dataclass(frozen=True)
class LocalServices:
    """Where the local services listen."""

    database_url: str
    s3_endpoint_url: str


@dataclass(frozen=True)
class _Cluster:
    """A PostgreSQL cluster directory: data/, the Unix socket and the server log."""

    root: Path
    throwaway: bool  # a /var/tmp fallback for a non-durable cluster: removed on exit

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.root / "data"


# --- processes and ports ---------------------------------------------------------------


def _run(cmd: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run cmd in its own session (so Ctrl-C does not reach it) and capture its output."""
    LOG.debug("running %s", shlex.join(cmd))
    return subprocess.run(  # noqa: S603 - our own fixed command lines
        cmd, cwd=cwd, capture_output=True, text=True, check=False, start_new_session=True
    )


def _spawn(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """Start cmd in its own session; it gets SIGTERM if this process dies first."""
    setpriv = shutil.which("setpriv")
    # The death signal follows the thread that forked, so only ask for it from the main one.
    if setpriv and threading.current_thread() is threading.main_thread():
        cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
    stderr = subprocess.STDOUT if log is not None else None
    return subprocess.Popen(  # noqa: S603 - our own fixed command lines
        cmd, env=env, stdout=log, stderr=stderr, start_new_session=True
    )


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Terminate proc, kill it if it outlives timeout, and return its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            LOG.warning("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
            proc.kill()
    return proc.wait()


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def _choose_port(port: int | None, *, fallback: bool) -> int:
    """Return port, or a free one when it is None (or taken and fallback is allowed)."""
    if port is None:
        return _free_port()
    if fallback and not _port_is_free(port):
        free = _free_port()
        LOG.warning("port %d is taken; using %d instead", port, free)
        return free
    return port


# --- PostgreSQL ------------------------------------------------------------------------


def _pg_command(name: str, *args: str) -> list[str]:
    """Build a PostgreSQL command line, run as the postgres user when we are root."""
    path = PG_BINDIR / name
    binary = str(path) if path.exists() else shutil.which(name)
    if binary is None:
        raise RuntimeError(f"{name} not found: install PostgreSQL 15 (apt-get install postgresql)")
    return [*_as_pg_user(), binary, *args]


def _as_pg_user() -> list[str]:
    """The prefix that runs a command as the postgres user: PostgreSQL refuses to run as root."""
    return ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []


def _run_pg(cluster: _Cluster, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool from the cluster directory (the postgres user can enter it)."""
    return _run(_pg_command(name, *args), cwd=cluster.root)


def _claim_root(root: Path) -> bool:
    """Create root for the postgres user; False when that user could not use it."""
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return True
    shutil.chown(root, user=PG_USER)
    probe = _run([*_as_pg_user(), "test", "-x", str(root), "-a", "-w", str(root)])
    if probe.returncode == 0:
        return True
    if created:
        root.rmdir()
    return False


def _cluster_for(base_dir: Path, *, durable: bool) -> _Cluster:
    """Use base_dir/postgres, or a /var/tmp directory when the postgres user cannot reach it."""
    if _claim_root(base_dir / "postgres"):
        return _Cluster(base_dir / "postgres", throwaway=False)
    digest = hashlib.sha256(str(base_dir).encode()).hexdigest()[:12]
    root = Path("/var/tmp") / f"satchel-{digest}" / "postgres"  # noqa: S108 - private per checkout
    LOG.warning("user %s cannot reach %s; keeping the cluster in %s", PG_USER, base_dir, root)
    if not _claim_root(root):
        raise RuntimeError(f"user {PG_USER} cannot write to {root}")
    return _Cluster(root, throwaway=not durable)


def _init_cluster(cluster: _Cluster, *, durable: bool) -> None:
    """Run initdb unless the cluster exists; clear what a killed initdb left first."""
    if (cluster.data / "PG_VERSION").exists():
        return
    if cluster.data.exists():
        LOG.warning("removing the incomplete cluster in %s", cluster.data)
        shutil.rmtree(cluster.data)
    LOG.info("creating a PostgreSQL cluster in %s", cluster.data)
    no_sync = [] if durable else ["--no-sync"]
    args = ["-D", str(cluster.data), "--auth=trust", "-U", PG_USER, "--encoding=UTF8"]
    result = _run_pg(cluster, "initdb", *args, "--locale=C.UTF-8", *no_sync)
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed: {result.stderr.strip()}")


def _postmaster_pid(cluster: _Cluster) -> int | None:
    """The pid of the live postmaster serving this cluster, if any."""
    try:
        pid = int((cluster.data / "postmaster.pid").read_text().split("\n", 1)[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(cluster.data).encode() in cmdline else None


def _clear_leftover(cluster: _Cluster) -> None:
    """Stop a postmaster that a killed earlier run left running, or drop its stale pid file."""
    pid_file = cluster.data / "postmaster.pid"
    if _postmaster_pid(cluster) is not None:
        LOG.warning("stopping the PostgreSQL an earlier run left running in %s", cluster.data)
        _stop_postgres(cluster)
    elif pid_file.exists():
        # The pid in it may belong to an unrelated process by now, which would stop
        # PostgreSQL from starting ("lock file already exists").
        LOG.warning("removing the stale %s", pid_file)
        pid_file.unlink()


def _socket_dir(cluster: _Cluster) -> str:
    """Where the Unix socket goes: the cluster directory, or nowhere when its path is too long."""
    if len(f"{cluster.root}/.s.PGSQL.65535") < MAX_SOCKET_PATH:
        return str(cluster.root)
    LOG.info("%s is too long for a Unix socket; PostgreSQL listens on TCP only", cluster.root)
    return ""


def _start_postgres(cluster: _Cluster, port: int, *, durable: bool) -> None:
    """Start the cluster on 127.0.0.1:port and wait until it accepts connections."""
    options = ["-h", LOCALHOST, "-p", str(port), "-k", _socket_dir(cluster)]
    options += ["-c", "max_connections=200"]
    if not durable:
        options += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    log = cluster.root / "postgres.log"
    args = ["start", "-w", "-t", str(int(START_TIMEOUT)), "-D", str(cluster.data), "-l", str(log)]
    for attempt in range(1, PG_START_ATTEMPTS + 1):
        result = _run_pg(cluster, "pg_ctl", *args, "-o", shlex.join(options))
        if result.returncode == 0:
            return
        LOG.warning("PostgreSQL did not start (attempt %d); see %s", attempt, log)
        time.sleep(1)
    raise RuntimeError(f"PostgreSQL did not start on port {port}; see {log}")


def _stop_postgres(cluster: _Cluster) -> None:
    """Stop the cluster (fast shutdown, immediate if that fails); skip one not running."""
    for mode in ("fast", "immediate"):
        if _postmaster_pid(cluster) is None:
            return
        result = _run_pg(cluster, "pg_ctl", "stop", "-w", "-m", mode, "-D", str(cluster.data))
        if result.returncode == 0:
            return
        LOG.warning("pg_ctl stop -m %s failed: %s", mode, result.stderr.strip())


def _ensure_database(port: int) -> None:
    """Create the satchel database unless it exists."""
    with psycopg.connect(
        host=LOCALHOST, port=port, user=PG_USER, dbname="postgres", autocommit=True
    ) as conn:
        query = "SELECT 1 FROM pg_database WHERE datname = %s"
        if conn.execute(query, (DATABASE,)).fetchone() is None:
            LOG.info("creating database %s", DATABASE)
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))


@contextlib.contextmanager
def local_postgres(
    base_dir: Path, *, port: int | None = None, durable: bool = True, port_fallback: bool = False
) -> Iterator[str]:
    """Run the cluster kept in base_dir/postgres for the block; yield its DATABASE_URL."""
    cluster = _cluster_for(base_dir.resolve(), durable=durable)
    _init_cluster(cluster, durable=durable)
    _clear_leftover(cluster)
    port = _choose_port(port, fallback=port_fallback)
    try:
        _start_postgres(cluster, port, durable=durable)
        _ensure_database(port)
        LOG.info("PostgreSQL %s listens on %s:%d", cluster.data, LOCALHOST, port)
        yield f"postgresql://{PG_USER}@{LOCALHOST}:{port}/{DATABASE}"
    finally:
        _stop_postgres(cluster)
        if cluster.throwaway:
            shutil.rmtree(cluster.root.parent, ignore_errors=True)


# --- S3 (moto) -------------------------------------------------------------------------


def _http_status(port: int, method: str, path: str) -> int:
    """Send one bodiless request to 127.0.0.1:port and return the response status."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=5)
    try:
        conn.request(method, path)
        return conn.getresponse().status
    finally:
        conn.close()


def _wait_for_http(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the server proc started answers HTTP on port."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto exited with code {proc.returncode} before answering")
        with contextlib.suppress(OSError, http.client.HTTPException):
            _http_status(port, "GET", "/")
            return
        time.sleep(0.1)
    raise RuntimeError(f"moto did not answer on port {port} within {START_TIMEOUT:.0f} s")


def _create_bucket(port: int, bucket: str) -> None:
    """Create bucket; moto takes unsigned requests and treats them as S3 in us-east-1."""
    status = _http_status(port, "PUT", f"/{bucket}")
    if status not in (200, 409):  # 409: it exists already
        raise RuntimeError(f"creating bucket {bucket} failed with HTTP {status}")


@contextlib.contextmanager
def local_s3(
    log_dir: Path,
    *,
    port: int | None = None,
    bucket: str = DEFAULT_BUCKET,
    port_fallback: bool = False,
) -> Iterator[str]:
    """Run moto's S3 server with bucket in it for the block; yield its endpoint URL."""
    port = _choose_port(port, fallback=port_fallback)
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "moto.server", "-H", LOCALHOST, "-p", str(port)]
    with (log_dir / "moto.log").open("ab") as log:
        proc = _spawn(cmd, log=log)
        try:
            _wait_for_http(port, proc)
            _create_bucket(port, bucket)
            LOG.info("moto S3 listens on %s:%d with bucket %s", LOCALHOST, port, bucket)
            yield f"http://{LOCALHOST}:{port}"
        finally:
            _stop_process(proc, MOTO_STOP_TIMEOUT)


@contextlib.contextmanager
def local_services(
    base_dir: Path,
    *,
    pg_port: int | None = None,
    s3_port: int | None = None,
    bucket: str = DEFAULT_BUCKET,
    durable: bool = True,
) -> Iterator[LocalServices]:
    """Run PostgreSQL and moto's S3 for the block; durable=False trades safety for speed."""
    with (
        local_postgres(base_dir, port=pg_port, durable=durable) as database_url,
        local_s3(base_dir, port=s3_port, bucket=bucket) as s3_endpoint_url,
    ):
        yield LocalServices(database_url=database_url, s3_endpoint_url=s3_endpoint_url)


# --- `python -m server.devenv run` -----------------------------------------------------


class _Foreground:
    """Runs one child at a time and turns SIGINT/SIGTERM into SIGTERM for that child."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.child: subprocess.Popen[bytes] | None = None
        self.stop_requested: float | None = None

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Remember the stop request and pass it on to the running child."""
        LOG.info("got %s; stopping", signal.Signals(signum).name)
        self.stop_requested = self.stop_requested or time.monotonic()
        self._signal(signal.SIGTERM)

    def run(self, cmd: Sequence[str]) -> int:
        """Run cmd to its end, killing it when it outlives a stop request by 30 s."""
        self.child = _spawn(cmd, env=self.env)
        if self.stop_requested is not None:
            self._signal(signal.SIGTERM)
        while True:
            try:
                code = self.child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                self._kill_if_overdue()
                continue
            return code if code >= 0 else 128 - code

    def _signal(self, sig: signal.Signals) -> None:
        """Signal the child's process group, as a terminal's Ctrl-C would have."""
        # returncode stays None until we reap the child, so its pid cannot be reused yet.
        if self.child is not None and self.child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, sig)

    def _kill_if_overdue(self) -> None:
        """Kill the child when a stop request is older than CHILD_STOP_TIMEOUT."""
        overdue = time.monotonic() - (self.stop_requested or math.inf) > CHILD_STOP_TIMEOUT
        if overdue and self.child is not None:
            LOG.warning(
                "pid %d outlived SIGTERM by %.0f s; killing it", self.child.pid, CHILD_STOP_TIMEOUT
            )
            self._signal(signal.SIGKILL)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM during start-up into KeyboardInterrupt so the services are stopped."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _commands(extra: list[str]) -> list[list[str]]:
    """The commands to run: CMD from the command line, else migrate then serve."""
    if extra:
        return [extra]
    local = Path(sys.executable).parent / "satchel"
    satchel = str(local) if local.exists() else shutil.which("satchel")
    if satchel is None:
        raise SystemExit("satchel is not installed: run `make run` or pip install -e .")
    return [[satchel, "migrate"], [satchel, "serve"]]


def _service_env(stack: contextlib.ExitStack, args: argparse.Namespace) -> dict[str, str]:
    """Start the services the environment does not name; return the children's environment."""
    env = dict(os.environ)
    if not env.get("DATABASE_URL"):
        postgres = local_postgres(args.data_dir, port=args.pg_port, port_fallback=True)
        env["DATABASE_URL"] = stack.enter_context(postgres)
    if not env.get("S3_ENDPOINT_URL"):
        bucket = env.get("S3_BUCKET") or DEFAULT_BUCKET
        s3 = local_s3(args.data_dir, port=args.s3_port, bucket=bucket, port_fallback=True)
        env["S3_ENDPOINT_URL"] = stack.enter_context(s3)
        env.setdefault("AWS_ACCESS_KEY_ID", "testing")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    return env


def _redact(url: str) -> str:
    """url with its password, if any, masked for printing."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _summary(env: dict[str, str], extra: list[str]) -> str:
    """The one line that says where things are."""
    where = f"PostgreSQL at {_redact(env['DATABASE_URL'])}, S3 at {env['S3_ENDPOINT_URL']}"
    if extra:
        return f"{where}, running {shlex.join(extra)}"
    host, port = env.get("HOST") or LOCALHOST, env.get("PORT") or "8000"
    return f"{where}, Satchel on http://{host}:{port}"


def _run_all(commands: list[list[str]], env: dict[str, str]) -> int:
    """Run commands in turn in the foreground; stop at the first failure or stop request."""
    runner = _Foreground(env)
    signal.signal(signal.SIGINT, runner.on_signal)
    signal.signal(signal.SIGTERM, runner.on_signal)
    code = 0
    for cmd in commands:
        code = runner.run(cmd)
        if code != 0 or runner.stop_requested is not None:
            break
    return code


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m server.devenv", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="start local services, then Satchel (or CMD)")
    run.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".data")
    run.add_argument("--pg-port", type=int, default=RUN_PG_PORT)
    run.add_argument("--s3-port", type=int, default=RUN_S3_PORT)
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD... instead of Satchel")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Start what is missing, run the commands, stop what was started; return the exit code."""
    args = _parse_args(argv)
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = _commands(args.command)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.ExitStack() as stack:
            env = _service_env(stack, args)
            print(_summary(env, args.command), flush=True)
            return _run_all(commands, env)
    except KeyboardInterrupt:
        LOG.info("interrupted during start-up; stopped what had started")
        return 130


if __name__ == "__main__":
    sys.exit(main())
