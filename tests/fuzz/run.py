"""Fuzz a live Satchel with schemathesis, from its own /openapi.json.

    .venv/bin/python tests/fuzz/run.py                      # full budget: 1000 cases per operation
    .venv/bin/python tests/fuzz/run.py --max-examples 50    # what CI runs

Starts throwaway PostgreSQL and S3 (server.devenv), migrates, serves small files from a loopback
file server, runs `satchel serve` on a free port (one archive at a time, fetching only from that
file server), then runs every schemathesis phase (examples, coverage, fuzzing, stateful) with
the checks `not_a_server_error` and `response_schema_conformance`. tests/fuzz/hooks.py rewrites
generated task URLs to the file server, so nothing leaves the machine, and swaps most
well-formed ids for real ones, so the deep paths (tasks, batches, archives) are reached.

Exits non-zero when schemathesis finds a failure, the server logs an unhandled error, or a
stored task URL points anywhere but the file server.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg

from server.devenv import local_services
from storage.migrate import migrate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FULL_BUDGET = 1000
CHECKS = "not_a_server_error,response_schema_conformance"
PHASES = "examples,coverage,fuzzing,stateful"
START_TIMEOUT = 60.0
# What the server logs when a request ends in a 500 (handlers/base.py).
UNHANDLED = "unhandled error"


class _Files(http.server.BaseHTTPRequestHandler):
    """Any path is a small file whose bytes name the path."""

    def do_GET(self) -> None:
        body = f"satchel fuzz file {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: thousands of fetches are expected."""


@contextlib.contextmanager
def file_server() -> Iterator[str]:
    """A loopback HTTP server answering every GET with a few bytes; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return int(reply.status)
    except OSError as exc:
        return int(getattr(exc, "code", 0) or 0)


def _satchel_command() -> list[str]:
    script = Path(sys.executable).with_name("satchel")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "server.main", "serve"]


@contextlib.contextmanager
def satchel(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`satchel serve` on a free port until the block ends; yields its base URL once ready."""
    port = _free_port()
    env = {**env, "HOST": "127.0.0.1", "PORT": str(port)}
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(_satchel_command(), env=env, stdout=log, stderr=log, cwd=ROOT)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while _status(url + "/ready") != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"satchel did not become ready; see {log_path}")
                time.sleep(0.2)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _schemathesis(url: str, args: argparse.Namespace, env: dict[str, str], cwd: Path) -> int:
    # Run in `cwd` (the run's temporary directory): schemathesis keeps a cache there.
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{url}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        PHASES,
        "--max-examples",
        str(args.max_examples),
        "--workers",
        str(args.workers),
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "too_slow,filter_too_much",
    ]
    if args.seed is not None:
        command += ["--seed", str(args.seed)]
    if args.report_dir:
        command += ["--report", args.report, "--report-dir", str(args.report_dir)]
    return subprocess.run(command, env=env, check=False, cwd=cwd).returncode


def _check_stored_urls(database_url: str, files: str) -> int:
    """Report what the run stored; 1 if any stored task URL points off the file server."""
    with psycopg.connect(database_url) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM project), count(*),"
            " count(*) FILTER (WHERE status = 'finished'),"
            " count(*) FILTER (WHERE status = 'failed') FROM task"
        ).fetchone()
        escaped = conn.execute(
            "SELECT u FROM task, unnest(urls) AS u WHERE u NOT LIKE %s LIMIT 5", [files + "/%"]
        ).fetchall()
    assert counts is not None
    print("stored: {} projects, {} tasks ({} archives finished, {} failed)".format(*counts))
    if escaped:
        print(f"task URLs outside the file server {files}: {[row[0] for row in escaped]}")
        return 1
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--max-examples", type=int, default=FULL_BUDGET, help="cases per operation")
    parser.add_argument("--seed", type=int, help="schemathesis seed, to replay a run")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="schemathesis workers (>1 trips a CPython 3.11 ast race)",
    )
    parser.add_argument("--report-dir", type=Path, help="write reports and the server log here")
    parser.add_argument("--report", default="junit", help="schemathesis report formats")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the whole fuzzing session; 0 only when it found nothing."""
    args = _parse(argv)
    # A SIGTERM unwinds like an error, so the services and the server are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="satchel-fuzz-") as tmp:
        work = Path(tmp)
        with local_services(work / "services", durable=False) as found, file_server() as files:
            migrate(found.database_url)
            env = {
                **os.environ,
                "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
                "DATABASE_URL": found.database_url,
                "S3_ENDPOINT_URL": found.s3_endpoint_url,
                "JOB_CONCURRENCY": "1",
                "FETCH_ALLOWLIST": files.removeprefix("http://"),
                "LOG_FORMAT": "text",
                "LOG_LEVEL": "WARNING",
            }
            log_path = work / "satchel.log"
            with satchel(env, log_path) as url:
                fuzz_env = {
                    **env,
                    "SCHEMATHESIS_HOOKS": str(HERE / "hooks.py"),
                    "FUZZ_FILE_SERVER": files,
                }
                code = _schemathesis(url, args, fuzz_env, work)
                code = _check_stored_urls(found.database_url, files) or code
            server_log = log_path.read_text(errors="replace")
            if UNHANDLED in server_log:
                print(f"the server logged unhandled errors:\n{server_log[-20000:]}")
                code = code or 1
            if args.report_dir:
                shutil.copy(log_path, args.report_dir / "satchel.log")
    return code


if __name__ == "__main__":
    sys.exit(main())
