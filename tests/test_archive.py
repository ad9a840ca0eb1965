"""Archive runs end to end: real moto S3, a loopback origin allowed through FETCH_ALLOWLIST."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import zipfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tornado.httpclient
from api_helpers import create_project, create_tasks, task_item
from origin import FileSpec, Origin, allow, start_origin, stop_origin

from tasks.fetcher import Fetcher


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    found, server = await start_origin()
    yield found
    await stop_origin(server)


async def wait_for(app: Any, task_id: str, statuses: tuple[str, ...], timeout: float = 30) -> Any:
    """Poll the task until its status is one of `statuses`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        task = (await app.fetch(f"/tasks/{task_id}")).json()
        if task["status"] in statuses:
            return task
        assert asyncio.get_running_loop().time() < deadline, task
        await asyncio.sleep(0.1)


async def download(url: str) -> bytes:
    reply = await tornado.httpclient.AsyncHTTPClient().fetch(url)
    return reply.body


async def open_uploads(app: Any) -> list[Any]:
    objects = app.services.objects
    listing = await objects.client.list_multipart_uploads(Bucket=objects.bucket)
    return listing.get("Uploads", [])


async def runner_app(make_server: Any, origin: Origin, **overrides: Any) -> Any:
    return await make_server(
        **{"job_concurrency": 2, "fetch_allowlist": allow(origin), **overrides}
    )


async def test_finished_archive_holds_every_file(make_server: Any, origin: Origin) -> None:
    app = await runner_app(make_server, origin)
    random_bytes = os.urandom(3 * 1024 * 1024)
    text = b"hello archive\n" * 50000
    origin.files.update(
        {
            "a/logo.png": FileSpec(random_bytes, "image/png"),
            "b/logo.png": FileSpec(b"second logo", "image/png"),
            "über.txt": FileSpec(text, "text/plain"),
        }
    )
    project = await create_project(app)
    urls = [f"{origin.url}/a/logo.png", f"{origin.url}/b/logo.png", f"{origin.url}/%C3%BCber.txt"]
    [task] = await create_tasks(app, task_item(project["uuid"], "Files", urls=urls))
    done = await wait_for(app, task["uuid"], ("finished", "failed"))
    assert done["status"] == "finished", done["error"]
    assert done["progress"] == 100 and done["error"] is None
    body = await download(done["archive_url"])
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        names = archive.namelist()
        assert names == ["logo.png", "logo (1).png", "über.txt"]
        assert archive.read("logo.png") == random_bytes
        assert archive.read("logo (1).png") == b"second logo"
        assert archive.read("über.txt") == text
        infos = {i.filename: i for i in archive.infolist()}
        assert infos["logo.png"].compress_type == zipfile.ZIP_STORED
        assert infos["über.txt"].compress_type == zipfile.ZIP_DEFLATED
        assert infos["über.txt"].flag_bits & 0x800
    redirect = await app.fetch(f"/tasks/{task['uuid']}/archive")
    assert redirect.code == 302
    assert await download(redirect.headers["Location"]) == body
    assert await open_uploads(app) == []


async def test_origin_404_fails_the_task_and_leaves_no_upload(
    make_server: Any, origin: Origin
) -> None:
    app = await runner_app(make_server, origin)
    project = await create_project(app)
    url = f"{origin.url}/missing.png"
    [task] = await create_tasks(app, task_item(project["uuid"], "Missing", urls=[url]))
    done = await wait_for(app, task["uuid"], ("finished", "failed"))
    assert done["status"] == "failed"
    assert url in done["error"] and "404" in done["error"]
    assert done["archive_url"] is None and done["progress"] < 100
    assert origin.hits["missing.png"] == 1
    assert (await app.fetch(f"/tasks/{task['uuid']}/archive")).code == 409
    assert await open_uploads(app) == []


async def test_internal_address_is_refused_without_a_request(
    make_server: Any, origin: Origin
) -> None:
    app = await runner_app(make_server, origin)
    origin.files["x.png"] = FileSpec(b"x")
    port = origin.url.rsplit(":", 1)[1]
    project = await create_project(app)
    [task] = await create_tasks(
        app, task_item(project["uuid"], "Sneaky", urls=[f"http://localhost:{port}/x.png"])
    )
    done = await wait_for(app, task["uuid"], ("finished", "failed"))
    assert done["status"] == "failed" and "refused" in done["error"]
    assert origin.hits["x.png"] == 0


async def test_progress_rises_to_100_exactly_at_finished(make_server: Any, origin: Origin) -> None:
    app = await runner_app(make_server, origin)
    origin.files["slow.bin"] = FileSpec(os.urandom(2 * 1024 * 1024), delay_per_chunk=0.05)
    project = await create_project(app)
    [task] = await create_tasks(
        app, task_item(project["uuid"], "Slow", urls=[f"{origin.url}/slow.bin"])
    )
    seen = []
    while True:
        current = (await app.fetch(f"/tasks/{task['uuid']}")).json()
        seen.append((current["status"], current["progress"]))
        if current["status"] in ("finished", "failed"):
            break
        await asyncio.sleep(0.05)
    assert seen[-1] == ("finished", 100)
    progress = [p for _, p in seen]
    assert progress == sorted(progress)
    assert all(p < 100 for s, p in seen if s != "finished")
    assert any(0 < p < 100 for p in progress)


async def test_urls_change_mid_run_restarts_with_the_new_files(
    make_server: Any, origin: Origin
) -> None:
    app = await runner_app(make_server, origin)
    origin.files["old.bin"] = FileSpec(os.urandom(4 * 1024 * 1024), delay_per_chunk=0.05)
    origin.files["new.txt"] = FileSpec(b"the new file")
    project = await create_project(app)
    [task] = await create_tasks(
        app, task_item(project["uuid"], "Changing", urls=[f"{origin.url}/old.bin"])
    )
    await wait_for(app, task["uuid"], ("processing",))
    await asyncio.sleep(0.5)
    update = [{"task_id": task["uuid"], "urls": [f"{origin.url}/new.txt"]}]
    changed = await app.fetch("/tasks/batch_update", "POST", update)
    assert changed.json()["items"][0]["status"] == "initialized"
    assert changed.json()["items"][0]["progress"] == 0
    done = await wait_for(app, task["uuid"], ("finished", "failed"))
    assert done["status"] == "finished", done["error"]
    with zipfile.ZipFile(io.BytesIO(await download(done["archive_url"]))) as archive:
        assert archive.namelist() == ["new.txt"]
    objects = app.services.objects
    listing = await objects.client.list_objects_v2(
        Bucket=objects.bucket, Prefix=f"archives/{task['uuid']}/"
    )
    assert len(listing.get("Contents", [])) == 1
    assert await open_uploads(app) == []


async def test_a_run_that_lost_its_lock_is_taken_over(make_server: Any, origin: Origin) -> None:
    first = await runner_app(make_server, origin, job_concurrency=1)
    origin.files["slow.bin"] = FileSpec(os.urandom(3 * 1024 * 1024), delay_per_chunk=0.05)
    project = await create_project(first)
    [task] = await create_tasks(
        first, task_item(project["uuid"], "Slow", urls=[f"{origin.url}/slow.bin"])
    )
    await wait_for(first, task["uuid"], ("processing",))
    second = await runner_app(make_server, origin, job_concurrency=1)
    # The first run's lock connection drops while the run itself goes on.
    killed = await first.services.db.fetchone(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'satchel-run-lock'"
    )
    assert killed[0] == 1
    done = await wait_for(second, task["uuid"], ("finished", "failed"), timeout=60)
    assert done["status"] == "finished", done["error"]
    epoch = (
        await first.services.db.fetchone("SELECT epoch FROM task WHERE uuid = %s", [task["uuid"]])
    )[0]
    assert epoch >= 2
    with zipfile.ZipFile(io.BytesIO(await download(done["archive_url"]))) as archive:
        assert archive.read("slow.bin") == origin.files["slow.bin"].body
    objects = first.services.objects
    await asyncio.sleep(1)
    listing = await objects.client.list_objects_v2(
        Bucket=objects.bucket, Prefix=f"archives/{task['uuid']}/"
    )
    assert [o["Key"] for o in listing.get("Contents", [])] == [
        f"archives/{task['uuid']}/{epoch}.zip"
    ]
    assert await open_uploads(first) == []
    # The fenced first run wrote nothing after the takeover: the task stays finished.
    assert (await first.fetch(f"/tasks/{task['uuid']}")).json()["status"] == "finished"


async def test_two_runners_never_run_one_task_twice(make_server: Any, origin: Origin) -> None:
    one = await runner_app(make_server, origin, job_concurrency=4)
    two = await runner_app(make_server, origin, job_concurrency=4)
    for i in range(100):
        origin.files[f"f{i}.txt"] = FileSpec(f"file {i}".encode())
    project = await create_project(one)
    items = [
        task_item(project["uuid"], f"T{i}", urls=[f"{origin.url}/f{i}.txt"]) for i in range(100)
    ]
    tasks = await create_tasks(one, *items)
    for task in tasks:
        done = await wait_for(two, task["uuid"], ("finished", "failed"), timeout=120)
        assert done["status"] == "finished", done["error"]
    assert all(origin.hits[f"f{i}.txt"] == 1 for i in range(100)), origin.hits
    rows = await one.services.db.fetchall(
        "SELECT task_id, count(*) FROM event WHERE type = 'task.archived'"
        " AND task_id = ANY(%s::uuid[]) GROUP BY task_id",
        [[t["uuid"] for t in tasks]],
    )
    assert len(rows) == 100 and all(count == 1 for _, count in rows)
    metrics = (await one.fetch("/metrics")).body.decode() + (
        await two.fetch("/metrics")
    ).body.decode()
    finished = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('satchel_archives_total{outcome="finished"}')
    )
    assert finished == 100


async def test_shutdown_drains_then_cancels_and_another_instance_takes_over(
    make_server: Any, origin: Origin
) -> None:
    leaving = await runner_app(make_server, origin, job_concurrency=1)
    origin.files["quick.txt"] = FileSpec(b"quick")
    origin.files["slow.bin"] = FileSpec(os.urandom(3 * 1024 * 1024), delay_per_chunk=0.05)
    project = await create_project(leaving)
    [slow] = await create_tasks(
        leaving, task_item(project["uuid"], "Slow", urls=[f"{origin.url}/slow.bin"])
    )
    await wait_for(leaving, slow["uuid"], ("processing",))
    # The drain window is too short for this archive: the run is cancelled and let go.
    await leaving.services.runner.stop(drain_timeout=0.3)
    assert leaving.services.runner.running == {}
    task = (await leaving.fetch(f"/tasks/{slow['uuid']}")).json()
    assert task["status"] == "processing"
    assert await open_uploads(leaving) == []
    staying = await runner_app(make_server, origin, job_concurrency=1)
    done = await wait_for(staying, slow["uuid"], ("finished", "failed"), timeout=60)
    assert done["status"] == "finished", done["error"]


async def test_shutdown_lets_a_short_archive_finish(make_server: Any, origin: Origin) -> None:
    app = await runner_app(make_server, origin, job_concurrency=1)
    origin.files["medium.bin"] = FileSpec(os.urandom(1024 * 1024), delay_per_chunk=0.05)
    project = await create_project(app)
    [task] = await create_tasks(
        app, task_item(project["uuid"], "Medium", urls=[f"{origin.url}/medium.bin"])
    )
    await wait_for(app, task["uuid"], ("processing",))
    await app.services.runner.stop(drain_timeout=30)
    done = (await app.fetch(f"/tasks/{task['uuid']}")).json()
    assert done["status"] == "finished", done["error"]


def _raw(length: int, body: bytes, content_type: str = "application/octet-stream") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    return head.encode() + body


FAILURES = {
    "stalled": (FileSpec(b"", raw=_raw(1000, b"x" * 100), stall=5), "stalled"),
    "cut short": (FileSpec(b"", raw=_raw(1000, b"x" * 100)), "closed after 100 of 1000 bytes"),
    "over size": (FileSpec(b"y" * 5000), "larger than the limit"),
    "html page": (FileSpec(b"<html></html>", "text/html"), "HTML page"),
    "always 503": (FileSpec(b"z", fail_first=10), "503"),
}


@pytest.mark.parametrize("case", list(FAILURES))
async def test_origin_failures_fail_the_task_and_leave_no_upload(
    make_server: Any, origin: Origin, case: str
) -> None:
    app = await runner_app(make_server, origin, max_file_bytes=4096)
    # A short stall timeout, as an operator would not wait 30 s in a test.
    policy = app.services.runner.fetcher.policy
    app.services.runner.fetcher = Fetcher(
        dataclasses.replace(policy, stall_timeout=0.5, backoff=0.05)
    )
    spec, reason = FAILURES[case]
    origin.files["file.png"] = spec
    project = await create_project(app)
    [task] = await create_tasks(
        app, task_item(project["uuid"], "Bad", urls=[f"{origin.url}/file.png"])
    )
    done = await wait_for(app, task["uuid"], ("finished", "failed"))
    assert done["status"] == "failed"
    assert f"{origin.url}/file.png" in done["error"] and reason in done["error"], done["error"]
    assert await open_uploads(app) == []


async def test_transient_503s_are_retried_until_the_file_comes(
    make_server: Any, origin: Origin
) -> None:
    app = await runner_app(make_server, origin)
    policy = app.services.runner.fetcher.policy
    app.services.runner.fetcher = Fetcher(dataclasses.replace(policy, backoff=0.05))
    origin.files["flaky.txt"] = FileSpec(b"finally", fail_first=2)
    project = await create_project(app)
    [task] = await create_tasks(
        app, task_item(project["uuid"], "Flaky", urls=[f"{origin.url}/flaky.txt"])
    )
    done = await wait_for(app, task["uuid"], ("finished", "failed"))
    assert done["status"] == "finished", done["error"]
    assert origin.hits["flaky.txt"] == 3
    with zipfile.ZipFile(io.BytesIO(await download(done["archive_url"]))) as archive:
        assert archive.read("flaky.txt") == b"finally"
    assert await open_uploads(app) == []
