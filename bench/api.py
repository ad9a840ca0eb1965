"""REST throughput against a bare Tornado hello-world, side by side in one run.

`python -m bench.api [--seconds 10 --rounds 3 ...]` seeds 10,000 projects and 100,000 tasks,
starts `satchel serve` and `python -m bench.hello` as separate single processes on loopback,
checks one response of each, then loads `GET /`, `GET /projects?limit=50` and
`GET /tasks?limit=50` in interleaved rounds with the same load generator settings, and prints
requests/s, latency and the ratios to hello-world (goal: projects at >= 0.35 of it).

PostgreSQL and S3 are local throwaway ones in a temporary directory, unless DATABASE_URL is set:
then everything is seeded into a schema of its own (satchel_bench), dropped at the end.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from bench import (
    CpuMeter,
    CpuUse,
    Load,
    LoadGenerator,
    Result,
    Server,
    find_wrk,
    get,
    running,
    satchel_command,
    services,
    with_search_path,
)
from storage.migrate import migrate

GOAL = 0.35  # GET /projects at this share of the hello-world rate, or better
SCHEMA = "satchel_bench"  # where a shared DATABASE_URL gets its data
PAGE = 50
TARGETS = {
    "hello": "/",
    "projects": f"/projects?limit={PAGE}",
    "tasks": f"/tasks?limit={PAGE}",
}


# --- seeding -------------------------------------------------------------------------------

# Each project gets tasks/projects tasks (10 by default), priced so that their sum stays under
# the project's price. A project's stage (k % 4) decides its tasks' statuses: all finished,
# mostly finished, mixed with one failed, or all new, so the aggregates vary like real data.
_SEED = """
CREATE TEMP TABLE bench_project ON COMMIT DROP AS
SELECT k, gen_random_uuid() AS uuid,
       now() - interval '120 days' + k * interval '10 minutes' AS created_at,
       (1000 + (k * 7919) % 49000 + (k % 100) / 100.0)::numeric(14, 2) AS price
FROM generate_series(1, {projects}) AS k;

INSERT INTO project (uuid, name, description, price, created_at, updated_at)
SELECT uuid,
       (ARRAY['Site redesign', 'Brand refresh', 'Spring catalogue', 'Mobile app launch',
              'Annual report', 'Trade show booth', 'Product photography', 'Onboarding videos',
              'Packaging update', 'Newsletter templates'])[1 + k % 10]
       || ' for ' || (ARRAY['Acme', 'Globex', 'Initech', 'Umbrella', 'Hooli', 'Stark',
                            'Wayne', 'Wonka', 'Tyrell', 'Cyberdyne', 'Soylent'])[1 + k % 11]
       || ' #' || k,
       CASE WHEN k % 3 <> 0 THEN 'Deliverables agreed on the kick-off call of project ' || k
            || '; every task collects its source files into one archive.' END,
       price, created_at, created_at + (k % 50) * interval '1 hour'
FROM bench_project;

INSERT INTO task (uuid, project_id, name, description, estimate_date, price, urls, status,
                  progress, archive_key, error, created_at, updated_at)
SELECT uuid, project_id,
       (ARRAY['Logos', 'Hero images', 'Product shots', 'Fonts', 'Brochure PDF', 'Icon set',
              'Banner ads', 'Press kit', 'Storyboard', 'Colour palette'])[1 + j % 10]
       || ' v' || (1 + i % 3),
       CASE WHEN i % 4 = 0 THEN 'Final files as approved by the client, round ' || (i % 5) END,
       CASE WHEN i % 5 <> 0 THEN current_date + (i % 180)::int END,
       CASE WHEN i % 4 <> 1 THEN round(project_price / {price_share}, 2) END,
       ARRAY(SELECT format('https://%s/projects/%s/%s-%s.%s',
                           (ARRAY['cdn.example.com', 'files.example.org',
                                  'assets.example.net'])[1 + (i + u) % 3],
                           k,
                           (ARRAY['logo', 'brief', 'hero', 'font', 'mockup',
                                  'copy'])[1 + (i + u) % 6],
                           u,
                           (ARRAY['png', 'pdf', 'jpg', 'woff2', 'psd', 'docx'])[1 + (i + u) % 6])
             FROM generate_series(1, 1 + i % 3) AS u),
       status,
       CASE status WHEN 'finished' THEN 100 WHEN 'processing' THEN 5 + i % 90
                   WHEN 'failed' THEN i % 60 ELSE 0 END,
       CASE WHEN {archive_keys} AND status = 'finished' THEN 'archives/' || uuid || '.zip' END,
       CASE WHEN status = 'failed'
            THEN 'https://files.example.org/projects/' || k || '/brief-1.pdf answered 404 Not Found'
       END,
       created_at, created_at + (i % 7) * interval '1 hour'
FROM (
    SELECT i, j, p.k, p.uuid AS project_id, p.price AS project_price, gen_random_uuid() AS uuid,
           p.created_at + j * interval '5 hours' + (i % 60) * interval '1 second' AS created_at,
           (CASE p.k % 4
                WHEN 0 THEN 'finished'
                WHEN 1 THEN CASE WHEN j < 6 THEN 'finished' WHEN j < 8 THEN 'processing'
                                 ELSE 'initialized' END
                WHEN 2 THEN CASE WHEN j < 3 THEN 'finished' WHEN j = 3 THEN 'failed'
                                 WHEN j < 6 THEN 'processing' ELSE 'initialized' END
                ELSE 'initialized'
            END)::task_status AS status
    FROM generate_series(1, {tasks}) AS i
    CROSS JOIN LATERAL (SELECT (i - 1) / {projects} AS j) AS jj
    JOIN bench_project AS p ON p.k = 1 + (i - 1) % {projects}
) AS t;
"""


def seed(url: str, *, projects: int, tasks: int, archive_keys: bool) -> None:
    """Fill an empty schema with projects and tasks in a few statements, then VACUUM ANALYZE."""
    per_project = -(-tasks // projects)
    sql = _SEED.format(
        projects=int(projects),
        tasks=int(tasks),
        price_share=per_project + 2,
        archive_keys="true" if archive_keys else "false",
    )
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(sql.encode())
        # The visibility map and statistics a settled database would have from autovacuum.
        conn.execute("VACUUM ANALYZE project, task")


def task_statuses(url: str) -> dict[str, int]:
    """How many tasks have each status: the run must leave them as seeded."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT status::text, count(*) FROM task GROUP BY 1 ORDER BY 1")
        return {status: count for status, count in rows}


def prepare_database(url: str, *, shared: bool, args: argparse.Namespace) -> str:
    """Migrate and seed; on a shared database inside SCHEMA. Returns the URL to serve from."""
    if shared:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            conn.execute(f"CREATE SCHEMA {SCHEMA}")
        url = with_search_path(url, SCHEMA)
    migrate(url)
    seed(url, projects=args.projects, tasks=args.tasks, archive_keys=args.archive_keys)
    return url


def drop_schema(url: str) -> None:
    """Remove what prepare_database put into a shared database."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


# --- checks --------------------------------------------------------------------------------


def check_responses(ports: Mapping[str, int], args: argparse.Namespace) -> list[str]:
    """One request per target before timing: 200, JSON, and the seeded data. Returns problems."""
    problems = []
    for target, path in TARGETS.items():
        status, headers, body = get(ports[target], path)
        content_type = headers.get("content-type", "")
        if status != 200 or not content_type.startswith("application/json"):
            problems.append(f"{target}: {status} {content_type}: {body[:300]!r}")
            continue
        problems += [f"{target}: {p}" for p in _check_body(target, json.loads(body), args)]
    return problems


def _check_body(target: str, data: Any, args: argparse.Namespace) -> list[str]:
    if target == "hello":
        return [] if data == {"hello": "world"} else [f"unexpected body {data!r}"]
    total = args.projects if target == "projects" else args.tasks
    problems = []
    if len(data["items"]) != PAGE or data["total"] != total:
        problems.append(f"{len(data['items'])} items of {data['total']}, not {PAGE} of {total}")
    item = data["items"][0] if data["items"] else {}
    project = item.get("project", item) if target == "tasks" else item
    if target == "tasks" and not 1 <= len(item.get("urls", [])) <= 3:
        problems.append(f"urls {item.get('urls')!r}")
    if not project.get("tasks_count"):
        problems.append(f"no tasks_count in {project!r}")
    return problems


# --- measuring -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One target loaded once."""

    round: int
    target: str
    result: Result
    cpu: CpuUse


def measure(
    servers: Mapping[str, Server],
    load: LoadGenerator,
    *,
    rounds: int,
    warmup: float,
    postgres_port: int | None,
) -> list[Measurement]:
    """Warm every target up, then load each once per round, rotating the order per round."""
    names = list(TARGETS)
    if warmup > 0:
        for name in names:
            load.run(servers[name].port, TARGETS[name], warmup)
    found = []
    for number in range(1, rounds + 1):
        shift = (number - 1) % len(names)
        for name in names[shift:] + names[:shift]:
            server = servers[name]
            meter = CpuMeter(server.proc.pid, postgres_port)
            before = meter.snapshot()
            result = load.run(server.port, TARGETS[name])
            found.append(Measurement(number, name, result, meter.use(before, meter.snapshot())))
            print(_row(found[-1]), flush=True)
    return found


LABELS = {name: f"{name:<8} GET {path}" for name, path in TARGETS.items()}
HEADER = (
    f"{'round':>5}  {'target':<31} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
    f"   CPU%: {'server':>6} {'pg':>4} {'load':>4} {'other':>5}"
)


def _row(m: Measurement) -> str:
    r, c = m.result, m.cpu
    return (
        f"{m.round:>5}  {LABELS[m.target]:<31} {r.rps:>8.1f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f}"
        f" {r.errors:>6}         {c.server:>6.0%} {c.postgres:>4.0%} {c.load:>4.0%} {c.other:>5.0%}"
    )


def summarise(found: Sequence[Measurement]) -> dict[str, Any]:
    """Medians per target and the per-round ratios to hello-world, with their medians."""
    by_round: dict[int, dict[str, Result]] = collections.defaultdict(dict)
    for m in found:
        by_round[m.round][m.target] = m.result
    summary: dict[str, Any] = {"targets": {}, "ratios": {}}
    for name in TARGETS:
        mine = [m for m in found if m.target == name]
        summary["targets"][name] = {
            "rps_median": statistics.median(m.result.rps for m in mine),
            "p99_ms_median": statistics.median(m.result.p99_ms for m in mine),
            "errors": sum(m.result.errors for m in mine),
            # CPU per request moves less than req/s when other work shares the machine.
            "server_cpu_ms_per_request": statistics.median(_per_request(m, "server") for m in mine),
            "postgres_cpu_ms_per_request": statistics.median(
                _per_request(m, "postgres") for m in mine
            ),
        }
    for name in ("projects", "tasks"):
        per_round = [r[name].rps / r["hello"].rps for r in by_round.values() if r["hello"].rps]
        summary["ratios"][name] = {"rounds": per_round, "median": statistics.median(per_round)}
    return summary


def _per_request(m: Measurement, who: str) -> float:
    """Milliseconds of CPU that `who` spent per request in this measurement."""
    return float(getattr(m.cpu, who)) / m.result.rps * 1000 if m.result.rps else 0.0


def report(summary: Mapping[str, Any]) -> None:
    """Print the medians and the ratios."""
    print("\nmedians across rounds:")
    for name, values in summary["targets"].items():
        print(
            f"  {LABELS[name]:<31} {values['rps_median']:>8.1f} req/s"
            f"   p99 {values['p99_ms_median']:>7.2f} ms   errors {values['errors']}"
            f"   CPU per request: server {values['server_cpu_ms_per_request']:.3f} ms,"
            f" pg {values['postgres_cpu_ms_per_request']:.3f} ms"
        )
    print("ratios to hello-world (per round -> median):")
    for name, ratio in summary["ratios"].items():
        rounds = ", ".join(f"{r:.3f}" for r in ratio["rounds"])
        verdict = ""
        if name == "projects":
            verdict = f"   goal >= {GOAL}: {'met' if ratio['median'] >= GOAL else 'MISSED'}"
        print(f"  {name}/hello: {rounds} -> {ratio['median']:.3f}{verdict}")


# --- profiling -----------------------------------------------------------------------------


def profile(server: Server, load: LoadGenerator, seconds: float, out: Path) -> None:
    """Sample `satchel serve` with py-spy under GET /projects load; print the top frames.

    The collapsed stacks stay in `out` (flamegraph.pl or speedscope read them).
    """
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        print("\nprofile skipped: py-spy is not installed (pip install py-spy)")
        return
    loader = threading.Thread(
        target=load.run, args=(server.port, TARGETS["projects"], seconds + 2), daemon=True
    )
    loader.start()
    cmd = [py_spy, "record", "--pid", str(server.proc.pid), "--duration", str(int(seconds))]
    cmd += ["--rate", "250", "--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    subprocess.run(cmd, capture_output=True, check=True, timeout=seconds + 60)
    loader.join()
    print_profile(out.read_text().splitlines())


def print_profile(lines: Sequence[str], top: int = 20) -> None:
    """Self and inclusive shares of the busiest functions, from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        thread, *rest = stack.split(";")
        if not thread.startswith("thread ("):  # py-spy ran without --threads
            thread, rest = "thread (?)", [thread, *rest]
        threads[thread] += count
        frames = [_function(frame) for frame in rest] or ["<no Python frame>"]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    print(f"\nprofile of satchel serve under GET {TARGETS['projects']} ({total} samples):")
    shares = ", ".join(f"{name} {n / total:.1%}" for name, n in threads.most_common())
    print(f"  samples by thread: {shares}")
    # The event loop and the entry point hold every sample; they say nothing.
    for root in [f for f in inclusive if f.endswith(("(satchel)", "(server/main.py)"))]:
        del inclusive[root]
    for root in [f for f in inclusive if "(asyncio/" in f and not f.startswith("Handle._run")]:
        del inclusive[root]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"  top {top} by {title} time:")
        for frame, count in counter.most_common(top):
            print(f"    {count / total:>6.1%}  {frame}")


def _function(frame: str) -> str:
    """'name (path/to/file.py:123)' -> 'name (file.py)': lines of one function add up."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(path).parts[-2:]) if path else "?"
    return f"{name} ({short})"


# --- the run -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": _loadavg(),
    }


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine shows here."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__)
    parser.add_argument("--projects", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="per target and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds per target, once")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    parser.add_argument(
        "--archive-keys",
        action="store_true",
        help="give finished tasks an archive key, so GET /tasks presigns their links",
    )
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS", help="py-spy")
    parser.add_argument("--profile-out", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def load_generator(args: argparse.Namespace, workdir: Path) -> LoadGenerator:
    """wrk unless the Python client is asked for or wrk cannot be had."""
    wrk = None
    if args.client != "python":
        wrk = find_wrk(install=not args.no_install)
        if wrk is None and args.client == "wrk":
            raise SystemExit("wrk is not available")
        if wrk is None:
            print("wrk is not available: the Python client will likely be the bottleneck")
    return LoadGenerator(wrk, Load(args.connections, args.threads, args.seconds), workdir)


def server_env(database_url: str, s3_endpoint_url: str | None) -> dict[str, str]:
    """The environment of `satchel serve`: quiet logs, no archive jobs, our services."""
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"}
    env.pop("ARCHIVE_PUBLIC_BASE_URL", None)
    # The seeded tasks name files on the internet; the run must not start fetching them.
    env["JOB_CONCURRENCY"] = "0"
    env.setdefault("AWS_ACCESS_KEY_ID", "testing")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    if s3_endpoint_url:
        env["S3_ENDPOINT_URL"] = s3_endpoint_url
    return env


def run(args: argparse.Namespace, workdir: Path) -> int:
    """Everything between the services starting and stopping; returns the exit code."""
    info = machine()
    print(" ".join(f"{key}={value}" for key, value in info.items()), flush=True)
    load = load_generator(args, workdir)
    with services(workdir) as found:
        url = prepare_database(found.database_url, shared=not found.local, args=args)
        try:
            return _serve_and_measure(args, workdir, load, url, found.s3_endpoint_url, info)
        finally:
            if not found.local:
                drop_schema(found.database_url)


def _serve_and_measure(
    args: argparse.Namespace,
    workdir: Path,
    load: LoadGenerator,
    url: str,
    s3: str | None,
    info: dict[str, Any],
) -> int:
    seeded = task_statuses(url)
    print(f"seeded {args.projects} projects, {args.tasks} tasks: {seeded}", flush=True)
    hello_cmd = [sys.executable, "-m", "bench.hello"]
    env = server_env(url, s3)
    with (
        running(
            "satchel", satchel_command(), env=env, ready_path="/projects?limit=1", workdir=workdir
        ) as satchel,
        running("hello", hello_cmd, env=os.environ, ready_path="/", workdir=workdir) as hello,
    ):
        servers = {"hello": hello, "projects": satchel, "tasks": satchel}
        problems = check_responses({name: s.port for name, s in servers.items()}, args)
        if problems:
            print("responses are not as expected:\n  " + "\n  ".join(problems))
            return 1
        print(f"load: {load.name}, rounds: {args.rounds}, warm-up {args.warmup:g} s per target")
        print(HEADER, flush=True)
        pg_port = urlsplit(url).port or 5432
        found = measure(
            servers, load, rounds=args.rounds, warmup=args.warmup, postgres_port=pg_port
        )
        summary = summarise(found)
        report(summary)
        if args.profile > 0:
            profile(satchel, load, args.profile, args.profile_out or workdir / "profile.txt")
    print(f"load average after the run: {_loadavg()}")
    after = task_statuses(url)
    if after != seeded:
        print(f"task statuses changed during the run: {after}")
    if args.json:
        results = [{**asdict(m), "rps": m.result.rps} for m in found]
        record = {"machine": info, "load": load.name, "results": results, "summary": summary}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    errors = sum(m.result.errors for m in found)
    return 1 if errors or after != seeded else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.api`."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="satchel-bench-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
