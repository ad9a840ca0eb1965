"""The local services behind `make run` and the test suite start, work and leave nothing."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import botocore.session
import psycopg
import pytest

from server.devenv import local_postgres, local_services, main

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the postgres user can reach (pytest's tmp_path is private to us)."""
    path = Path(tempfile.mkdtemp(prefix="satchel-devenv-"))
    path.chmod(0o755)
    yield path
    for pid in _pids_running(str(path)):  # only after a failed test
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether pid is a running process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait until pid is gone; False if it outlives timeout."""
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _pids_running(*needles: str) -> list[int]:
    """The processes whose command line contains every needle."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if proc.name.isdigit() and all(n in cmdline for n in needles):
                found.append(int(proc.name))
    return [pid for pid in found if pid != os.getpid() and _alive(pid)]


def _wait_for_sleeper(marker: Path, launcher: int) -> int:
    """The pid of the launcher's child, which starts just after the summary line."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = set(_pids_running("time.sleep(60)", str(marker))) - {launcher}
        if pids:
            (pid,) = pids
            return pid
        time.sleep(0.05)
    raise AssertionError("the launcher did not start its command")


def _port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postmaster(database_url: str) -> tuple[int, Path]:
    """The postmaster's pid and data directory, asked from the server itself."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert row is not None
    data = Path(row[0])
    return int((data / "postmaster.pid").read_text().split()[0]), data


def test_services_work_and_leave_nothing_behind(tmp_path: Path) -> None:
    with local_services(tmp_path, durable=False, bucket="test-bucket") as services:
        pg_port = int(services.database_url.rsplit(":", 1)[1].split("/")[0])
        s3_port = int(services.s3_endpoint_url.rsplit(":", 1)[1])
        with psycopg.connect(services.database_url) as conn:
            row = conn.execute("SELECT current_database(), current_setting('fsync')").fetchone()
        assert row == ("satchel", "off")
        postmaster, data = _postmaster(services.database_url)
        (moto,) = _pids_running("moto.server", str(s3_port))

        s3 = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=services.s3_endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.put_object(Bucket="test-bucket", Key="hello.txt", Body=b"hi")
        listing = s3.list_objects_v2(Bucket="test-bucket")
        s3.close()
        assert [item["Key"] for item in listing["Contents"]] == ["hello.txt"]

    assert _wait_gone(postmaster)
    assert not _alive(moto)
    assert not _port_open(pg_port)
    assert not _port_open(s3_port)
    assert not _pids_running(str(data))
    # A throwaway cluster that had to live outside tmp_path is removed with it.
    assert data.is_relative_to(tmp_path) or not data.exists()


def test_services_stop_when_the_block_raises(open_dir: Path) -> None:
    seen: list[tuple[int, Path]] = []

    def crash_inside() -> None:
        with local_postgres(open_dir) as url:
            seen.append(_postmaster(url))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        crash_inside()

    ((postmaster, data),) = seen
    assert data.is_relative_to(open_dir)
    assert _wait_gone(postmaster)


@contextlib.contextmanager
def _launcher(data_dir: Path, pg_port: int, s3_port: int) -> Iterator[subprocess.Popen[str]]:
    """Run `python -m server.devenv run` with a sleeper as the server, past its summary."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", str(data_dir)]
    cmd = [sys.executable, "-m", "server.devenv", "run", "--data-dir", str(data_dir)]
    cmd += ["--pg-port", str(pg_port), "--s3-port", str(s3_port), "--", *sleeper]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "S3_ENDPOINT_URL")}
    with (
        (data_dir.parent / "launcher.log").open("a") as log,
        subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True
        ) as launcher,
    ):
        assert launcher.stdout is not None
        try:
            ready, _, _ = select.select([launcher.stdout], [], [], 60)
            assert ready, "the launcher printed no summary within 60 s"
            summary = launcher.stdout.readline()
            assert f"PostgreSQL at postgresql://postgres@127.0.0.1:{pg_port}/satchel" in summary
            assert f"S3 at http://127.0.0.1:{s3_port}" in summary
            yield launcher
        finally:
            launcher.kill()


def test_launcher_stops_everything_on_sigint(open_dir: Path) -> None:
    pg_port, s3_port = _free_port(), _free_port()
    with _launcher(open_dir / "data", pg_port, s3_port) as launcher:
        sleeper = _wait_for_sleeper(open_dir, launcher.pid)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=30) == 128 + signal.SIGTERM

    assert not _alive(sleeper)
    assert not _port_open(pg_port)
    assert not _port_open(s3_port)
    assert not _pids_running(str(open_dir))


def test_a_killed_launcher_does_not_block_the_next_start(open_dir: Path) -> None:
    pg_port, s3_port = _free_port(), _free_port()
    with _launcher(open_dir / "data", pg_port, s3_port) as launcher:
        leftover, _ = _postmaster(f"postgresql://postgres@127.0.0.1:{pg_port}/satchel")
        sleeper = _wait_for_sleeper(open_dir, launcher.pid)
        (moto,) = _pids_running("moto.server", str(s3_port))
        launcher.kill()

    # Its children die with it; the postmaster, started by pg_ctl, is left running.
    assert _wait_gone(sleeper)
    assert _wait_gone(moto)
    assert _alive(leftover)
    with local_postgres(open_dir / "data", port=pg_port) as url:
        postmaster, _ = _postmaster(url)
        assert postmaster != leftover
        os.kill(postmaster, signal.SIGKILL)  # and now a crash that leaves a stale pid file
        assert _wait_gone(postmaster)
    with local_postgres(open_dir / "data") as url, psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not _pids_running(str(open_dir))


@pytest.fixture
def launcher_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A clean environment for main() in this process; its signal handlers are undone."""
    for name in ("DATABASE_URL", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _run_env_dump(args: list[str], out: Path) -> int:
    """Run main() with a child that saves its environment to out and exits with 3."""
    script = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w')); exit(3)"
    return main(["run", *args, "--", sys.executable, "-c", script, str(out)])


@pytest.mark.usefixtures("launcher_env")
def test_run_starts_nothing_when_both_services_are_given(
    open_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:secret@db.example/satchel")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://s3.example")

    code = _run_env_dump(["--data-dir", str(open_dir / "data")], open_dir / "env.json")

    assert code == 3
    env = json.loads((open_dir / "env.json").read_text())
    assert env["DATABASE_URL"] == "postgresql://app:secret@db.example/satchel"
    assert "AWS_ACCESS_KEY_ID" not in env
    assert not (open_dir / "data").exists()
    summary = capsys.readouterr().out
    assert "PostgreSQL at postgresql://app:***@db.example/satchel, S3 at http://s3.example" in (
        summary
    )


@pytest.mark.usefixtures("launcher_env")
def test_run_starts_the_missing_s3_on_another_port_when_its_own_is_taken(
    open_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://db.example/satchel")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "mine")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--data-dir", str(open_dir / "data"), "--s3-port", str(port)]
        code = _run_env_dump(args, open_dir / "env.json")

    assert code == 3
    env = json.loads((open_dir / "env.json").read_text())
    s3_port = int(env["S3_ENDPOINT_URL"].rsplit(":", 1)[1])
    assert s3_port != port
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("testing", "mine")
    assert not _port_open(s3_port)
    assert not (open_dir / "data" / "postgres").exists()
