"""supervisord.conf for real: two instances, a drain on SIGTERM, a takeover after SIGKILL.

supervisord runs the repository's own config, pointed (through an env file) at the session's
PostgreSQL and S3 and at a loopback origin that serves slowly, so an archive is mid-run when
an instance is signalled.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import socket
import sys
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
from api_helpers import create_project, create_tasks, task_item
from origin import FileSpec, Origin, allow, start_origin, stop_origin

from server.config import Settings
from server.devenv import LocalServices
from server.main import REQUEST_GRACE

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
INSTANCES = (1, 2)  # supervisord's process_num: satchel-1 and satchel-2
DRAIN_TIMEOUT = 20


@dataclasses.dataclass
class Instance:
    """One process of the group, seen from outside: its name and port."""

    number: int
    port: int

    @property
    def name(self) -> str:
        """supervisorctl's name of the process."""
        return f"satchel:satchel-{self.number}"

    async def fetch(self, path: str, method: str = "GET", body: Any = None) -> Any:
        """A request to this instance (raises OSError while it does not listen)."""
        reply = await tornado.httpclient.AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            body=None if body is None else json.dumps(body),
            headers={"Content-Type": "application/json"} if body is not None else None,
            raise_error=False,
            request_timeout=10,
        )
        return _Reply(reply.code, reply.body or b"")


@dataclasses.dataclass
class _Reply:
    code: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclasses.dataclass
class Group:
    """A running supervisord and the instances of its group."""

    process: asyncio.subprocess.Process
    config: Path
    env: dict[str, str]
    log_dir: Path
    instances: list[Instance]
    pids: dict[int, int] = dataclasses.field(default_factory=dict)  # the latest of each

    async def ctl(self, *args: str) -> str:
        """Run supervisorctl against this supervisord; its output."""
        child = await asyncio.create_subprocess_exec(
            str(BIN / "supervisorctl"),
            "-c",
            str(self.config),
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await child.communicate()
        return out.decode()

    async def pid(self, instance: Instance) -> int:
        """The instance's process id (0 while it is not running)."""
        out = await self.ctl("pid", instance.name)
        pid = int(out.strip()) if out.strip().isdigit() else 0
        if pid:
            self.pids[instance.number] = pid
        return pid

    def log(self, name: str = "supervisord") -> str:
        """A log file of the group: supervisord's or an instance's (`satchel-1`)."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _free_base() -> int:
    """A base port whose next two ports are free."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1]) - 1
        if all(_port_free(base + n) for n in INSTANCES):
            return base
    raise RuntimeError("no two consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _write_env_file(path: Path, local: LocalServices, origin: Origin, base: int) -> None:
    values = {
        "SATCHEL_BASE_PORT": str(base),
        "HOST": "127.0.0.1",
        "DATABASE_URL": local.database_url,
        "S3_ENDPOINT_URL": local.s3_endpoint_url,
        "S3_BUCKET": "satchel-archives",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "JOB_CONCURRENCY": "1",
        "FETCH_ALLOWLIST": ",".join(allow(origin)),
        "DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
        "LOG_FORMAT": "json",
    }
    path.write_text("".join(f"{key}='{value}'\n" for key, value in values.items()))


@contextlib.asynccontextmanager
async def supervised(repo: Path, local: LocalServices, origin: Origin) -> AsyncIterator[Group]:
    """supervisord running the repo's config; whatever happens, nothing is left running."""
    with tempfile.TemporaryDirectory(prefix="satchel-sv-") as scratch:
        root = Path(scratch)  # short: the control socket's path must fit in 108 bytes
        (root / "run").mkdir()
        (root / "log").mkdir()
        base = _free_base()
        _write_env_file(root / "satchel.env", local, origin, base)
        env = {k: v for k, v in os.environ.items() if not k.startswith("COV_CORE_")}
        env.update(
            SATCHEL_ENV_FILE=str(root / "satchel.env"),
            SATCHEL_INSTANCES=str(len(INSTANCES)),
            SATCHEL_RUN_DIR=str(root / "run"),
            SATCHEL_LOG_DIR=str(root / "log"),
            PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        )
        config = repo / "supervisord.conf"
        process = await asyncio.create_subprocess_exec(
            str(BIN / "supervisord"),
            "-n",
            "-c",
            str(config),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,  # -n repeats its log file on stdout
            stderr=asyncio.subprocess.STDOUT,
        )
        instances = [Instance(n, base + n) for n in INSTANCES]
        group = Group(process, config, env, root / "log", instances)
        try:
            yield group
        finally:
            await _stop(group)


async def _stop(group: Group) -> None:
    """Leave nothing behind even when the test failed half-way."""
    if group.process.returncode is None:
        group.process.terminate()  # supervisord stops its group as on `shutdown`
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(group.process.wait(), 60)
    if group.process.returncode is None:
        group.process.kill()
        await group.process.wait()
        for (
            pid
        ) in group.pids.values():  # orphaned instances: only ours, checked by their command line
            if _is_satchel(pid):
                os.kill(pid, signal.SIGKILL)


def _is_satchel(pid: int) -> bool:
    try:
        return b"satchel\x00serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def _until(check: Any, timeout: float, interval: float = 0.1) -> Any:
    """Poll `check` (sync or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"gave up waiting for {check}")
        await asyncio.sleep(interval)


async def _ready(instance: Instance) -> bool:
    try:
        return bool((await instance.fetch("/ready")).code == 200)
    except OSError:
        return False


async def _in_flight(instance: Instance) -> float:
    try:
        text = (await instance.fetch("/metrics")).body.decode()
    except OSError:
        return 0.0
    found = re.search(r"^satchel_archive_runs_in_flight (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def _running_it(group: Group) -> Instance:
    """The one instance that is forming an archive now."""

    async def find() -> Instance | None:
        busy = [i for i in group.instances if await _in_flight(i) >= 1]
        return busy[0] if len(busy) == 1 else None

    found: Instance = await _until(find, 15)
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _task(instance: Instance, task_id: str) -> Any:
    return (await instance.fetch(f"/tasks/{task_id}")).json()


async def _finished(instance: Instance, task_id: str, timeout: float) -> Any:
    async def done() -> Any:
        task = await _task(instance, task_id)
        return task if task["status"] in ("finished", "failed") else None

    task = await _until(done, timeout, interval=0.2)
    assert task["status"] == "finished", task["error"]
    return task


def _epoch(task: Any) -> int:
    """The run epoch in the archive's object key (`archives/<task>/<epoch>.zip`)."""
    found = re.search(rf"/archives/{task['uuid']}/(\d+)\.zip", task["archive_url"])
    assert found, task["archive_url"]
    return int(found.group(1))


async def _uploads(objects: Any, task_id: str) -> list[Any]:
    listing = await objects.client.list_multipart_uploads(
        Bucket=objects.bucket, Prefix=f"archives/{task_id}/"
    )
    return list(listing.get("Uploads", []))


async def _download(url: str) -> bytes:
    return (await tornado.httpclient.AsyncHTTPClient().fetch(url)).body


async def _slow_task(app: Any, origin: Origin, instance: Instance, name: str, mib: int) -> Any:
    """A task whose one file trickles in for about `mib` * 0.8 seconds."""
    origin.files[f"{name}.bin"] = FileSpec(os.urandom(mib * 1024 * 1024), delay_per_chunk=0.05)
    project = await create_project(instance, name=name)
    [task] = await create_tasks(
        instance, task_item(project["uuid"], name, urls=[f"{origin.url}/{name}.bin"])
    )
    assert task["status"] == "initialized"
    return task


async def _restarted(group: Group, instance: Instance, old_pid: int) -> int:
    """supervisord started the instance again: its new pid, once it is ready."""
    new_pid: int = await _until(lambda: _new_pid(group, instance, old_pid), 30, interval=0.2)
    await _until(lambda: _ready(instance), 30, interval=0.2)
    return new_pid


async def _new_pid(group: Group, instance: Instance, old_pid: int) -> int:
    pid = await group.pid(instance)
    return pid if pid not in (0, old_pid) else 0


async def test_group_drains_on_sigterm_and_survives_sigkill(
    app: Any, local: LocalServices, repo_root: Path
) -> None:
    origin, origin_server = await start_origin()
    objects = app.services.objects
    try:
        async with supervised(repo_root, local, origin) as group:
            for instance in group.instances:
                await _until(lambda i=instance: _ready(i), 60, interval=0.2)
            pids = {i.number: await group.pid(i) for i in group.instances}
            assert all(pids.values()), await group.ctl("status")
            first = group.instances[0]

            # SIGTERM mid-archive: the instance stops accepting, finishes the run, exits 0.
            task = await _slow_task(app, origin, first, "drain", mib=5)
            busy = await _running_it(group)
            other = next(i for i in group.instances if i is not busy)
            await _until(lambda: _uploads(objects, task["uuid"]), 10)
            assert (await _task(other, task["uuid"]))["status"] == "processing"
            os.kill(pids[busy.number], signal.SIGTERM)
            await _until(lambda: not _listening(busy.port), 5, interval=0.02)
            assert (await _task(other, task["uuid"]))["status"] == "processing"
            await _until(lambda: _gone(pids[busy.number]), DRAIN_TIMEOUT + 15)
            drained = await _task(other, task["uuid"])
            assert drained["status"] == "finished", drained  # done before the process exited
            assert _epoch(drained) == 1  # by the run that was signalled, not a takeover
            assert origin.hits["drain.bin"] == 1
            with zipfile.ZipFile(io.BytesIO(await _download(drained["archive_url"]))) as archive:
                assert archive.read("drain.bin") == origin.files["drain.bin"].body
            assert f"exited: satchel-{busy.number} (exit status 0; expected)" in group.log()
            instance_log = group.log(f"satchel-{busy.number}")
            assert '"message": "draining 1 archive runs"' in instance_log
            pids[busy.number] = await _restarted(group, busy, pids[busy.number])

            # SIGKILL mid-archive: supervisord restarts it; the run lock died with its
            # connection, so a live instance takes the task over and aborts the dead upload.
            task = await _slow_task(app, origin, first, "kill", mib=6)
            busy = await _running_it(group)
            [dead_upload] = await _until(lambda: _uploads(objects, task["uuid"]), 10)
            killed = pids[busy.number]
            os.kill(killed, signal.SIGKILL)
            await _until(lambda: _gone(killed), 10)
            pids[busy.number] = await _restarted(group, busy, killed)
            assert f"exited: satchel-{busy.number} (terminated by SIGKILL" in group.log()
            done = await _finished(first, task["uuid"], 60)
            assert _epoch(done) >= 2
            with zipfile.ZipFile(io.BytesIO(await _download(done["archive_url"]))) as archive:
                assert archive.read("kill.bin") == origin.files["kill.bin"].body
            assert origin.hits["kill.bin"] >= 2
            assert await _uploads(objects, task["uuid"]) == [], dead_upload
            listing = await objects.client.list_objects_v2(
                Bucket=objects.bucket, Prefix=f"archives/{task['uuid']}/"
            )
            assert [o["Key"] for o in listing["Contents"]] == [
                f"archives/{task['uuid']}/{_epoch(done)}.zip"
            ]

            # A clean stop of the whole group: supervisord exits 0, every instance is gone.
            assert "Shut down" in await group.ctl("shutdown")
            assert await asyncio.wait_for(group.process.wait(), 60) == 0
            assert all(_gone(pid) for pid in (*pids.values(), killed))
            assert not any(_listening(i.port) for i in group.instances)
    finally:
        await stop_origin(origin_server)


def test_supervisord_waits_longer_than_a_drain(repo_root: Path) -> None:
    config = configparser.RawConfigParser()
    config.read(repo_root / "supervisord.conf")
    program = config["program:satchel"]
    assert program["stopsignal"] == "TERM"
    assert int(program["stopwaitsecs"]) > Settings().drain_timeout + REQUEST_GRACE
    assert program["autorestart"] == "true"
