"""The archive worker process `satchel serve` starts: archives, metrics, restarts, drain."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import zipfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
from api_helpers import create_project, create_tasks, task_item
from origin import FileSpec, Origin, allow, start_origin, stop_origin
from prometheus_client.parser import text_string_to_metric_families
from test_archive import download, open_uploads, wait_for

from server.config import ConfigError, Settings
from server.worker import decode_settings, encode_settings


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    found, server = await start_origin()
    yield found
    await stop_origin(server)


async def instance(make_server: Any, origin: Origin, **overrides: Any) -> Any:
    """An instance whose archives are formed in a worker process, as under `satchel serve`."""
    app = await make_server(
        archives=False, **{"job_concurrency": 2, "fetch_allowlist": allow(origin), **overrides}
    )
    await until(lambda: app.services.worker.proc is not None)
    return app


async def until(check: Any, timeout: float = 30) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := check()):
        assert asyncio.get_running_loop().time() < deadline, f"gave up waiting for {check}"
        await asyncio.sleep(0.05)
    return found


async def samples(app: Any) -> dict[str, float]:
    """The instance's /metrics as {'name{labels}': value}; every family must appear once."""
    reply = await app.fetch("/metrics")
    assert reply.code == 200
    families = list(text_string_to_metric_families(reply.body.decode()))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    found = {}
    for family in families:
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


async def archive_of(app: Any, origin: Origin, name: str, body: bytes) -> Any:
    origin.files[name] = FileSpec(body)
    project = await create_project(app, price="100")
    [task] = await create_tasks(
        app, task_item(project["uuid"], urls=[f"{origin.url}/{name}"], price="1")
    )
    done = await wait_for(app, task["uuid"], ("finished", "failed"), timeout=60)
    assert done["status"] == "finished", done
    with zipfile.ZipFile(io.BytesIO(await download(done["archive_url"]))) as archive:
        assert archive.read(name) == body
    return done


def autogroup_nice(pid: int) -> int | None:
    """The nice value of pid's autogroup, None where the kernel has none."""
    try:
        with open(f"/proc/{pid}/autogroup") as group:
            return int(group.read().split()[-1])
    except FileNotFoundError:
        return None


async def test_archives_are_formed_in_a_niced_child_process(
    make_server: Any, origin: Origin
) -> None:
    app = await instance(make_server, origin)
    worker = app.services.worker
    assert worker.proc.pid != os.getpid()
    niced = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    await until(lambda: os.getpriority(os.PRIO_PROCESS, worker.proc.pid) == niced)
    # A session of its own, so that where Linux shares CPU between sessions (autogroups) the
    # worker's use does not count against the API's; that session is niced as well.
    assert os.getsid(worker.proc.pid) == worker.proc.pid != os.getsid(0)
    assert autogroup_nice(worker.proc.pid) in (None, 10)
    await archive_of(app, origin, "one.bin", os.urandom(300_000))
    metrics = await samples(app)
    # The child's figures and the parent's own, each family once.
    assert metrics["satchel_archives_total{outcome=finished}"] == 1
    assert metrics["satchel_archives_total{outcome=started}"] == 1
    assert metrics["satchel_archive_bytes_downloaded_total{}"] == 300_000
    assert metrics["satchel_archive_runs_in_flight{}"] == 0
    assert metrics["satchel_archive_worker_up{}"] == 1
    assert metrics["satchel_archive_worker_restarts_total{}"] == 0
    assert any(k.startswith("satchel_http_requests_total{") for k in metrics)


async def test_a_worker_that_dies_is_started_again(make_server: Any, origin: Origin) -> None:
    app = await instance(make_server, origin)
    worker = app.services.worker
    first = worker.proc
    first.send_signal(signal.SIGKILL)
    await until(lambda: worker.starts == 2 and worker.proc is not first, timeout=15)
    metrics = await samples(app)
    assert metrics["satchel_archive_worker_restarts_total{}"] == 1
    await archive_of(app, origin, "after.bin", os.urandom(100_000))


async def test_stopping_drains_the_worker_then_it_exits(make_server: Any, origin: Origin) -> None:
    app = await instance(make_server, origin, drain_timeout=30)
    body = os.urandom(2 * 1024 * 1024)
    origin.files["slow.bin"] = FileSpec(body, delay_per_chunk=0.05)  # about 1.6 s
    project = await create_project(app, price="100")
    [task] = await create_tasks(
        app, task_item(project["uuid"], urls=[f"{origin.url}/slow.bin"], price="1")
    )
    await wait_for(app, task["uuid"], ("processing",))
    worker = app.services.worker
    await worker.stop(30)
    assert worker.proc.returncode == 0
    done = (await app.fetch(f"/tasks/{task['uuid']}")).json()
    assert done["status"] == "finished", done
    assert await open_uploads(app) == []
    metrics = await samples(app)
    assert metrics["satchel_archive_worker_up{}"] == 0


async def test_a_worker_past_its_drain_is_cancelled_and_aborts(
    make_server: Any, origin: Origin
) -> None:
    app = await instance(make_server, origin, drain_timeout=0.2)
    origin.files["stuck.bin"] = FileSpec(os.urandom(4 * 1024 * 1024), delay_per_chunk=0.2)
    project = await create_project(app, price="100")
    [task] = await create_tasks(
        app, task_item(project["uuid"], urls=[f"{origin.url}/stuck.bin"], price="1")
    )
    await wait_for(app, task["uuid"], ("processing",))
    await until(lambda: origin.hits["stuck.bin"])
    await app.services.worker.stop(0.2)
    assert (await app.fetch(f"/tasks/{task['uuid']}")).json()["status"] == "processing"
    assert await open_uploads(app) == []


def test_settings_reach_the_child_unchanged() -> None:
    settings = Settings(
        fetch_allowlist=("127.0.0.1:1", "10.0.0.0/8"),
        s3_endpoint_url=None,
        drain_timeout=1.5,
        archive_worker_nice=3,
    )
    assert decode_settings(encode_settings(settings)) == settings


def test_archive_worker_settings_are_checked() -> None:
    assert Settings.from_env({}).archive_worker == "process"
    found = Settings.from_env({"ARCHIVE_WORKER": "Inline", "ARCHIVE_WORKER_NICE": "5"})
    assert (found.archive_worker, found.archive_worker_nice) == ("inline", 5)
    with pytest.raises(ConfigError, match="ARCHIVE_WORKER"):
        Settings.from_env({"ARCHIVE_WORKER": "thread"})
    with pytest.raises(ConfigError, match="ARCHIVE_WORKER_NICE"):
        Settings.from_env({"ARCHIVE_WORKER_NICE": "-1"})
