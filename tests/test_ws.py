"""Live task events over /ws: every change once, filtered, resumable, across instances."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket
from api_helpers import create_project, create_tasks, task_item

import handlers.ws
from storage.db import Database
from storage.outbox import Event, record


async def connect(server: Any, query: str = "") -> tornado.websocket.WebSocketClientConnection:
    """A websocket client of `server`, once its feed has caught up with every committed event."""
    row = await server.services.db.fetchone("SELECT coalesce(max(id), 0) FROM event")
    for _ in range(500):
        if server.services.feed.last_id >= row[0]:
            break
        await asyncio.sleep(0.01)
    url = server.url.replace("http://", "ws://") + "/ws" + (f"?{query}" if query else "")
    return await tornado.websocket.websocket_connect(url)


async def receive(ws: Any, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next `count` messages."""
    messages = []
    for _ in range(count):
        raw = await asyncio.wait_for(ws.read_message(), timeout)
        assert raw is not None, f"closed after {messages}"
        messages.append(json.loads(raw))
    return messages


async def silent(ws: Any, wait: float = 0.5) -> bool:
    """True when nothing more arrives within `wait` seconds."""
    try:
        await asyncio.wait_for(ws.read_message(), wait)
    except TimeoutError:
        return True
    return False


async def test_creation_and_every_field_change_is_one_event(app: Any) -> None:
    ws = await connect(app)
    project = await create_project(app, price="100")
    created = await receive(ws, 1)
    assert created[0]["type"] == "project.created"
    assert created[0]["project"]["uuid"] == project["uuid"]
    [task] = await create_tasks(app, task_item(project["uuid"], "Logos", price="10"))
    messages = await receive(ws, 2)
    assert [m["type"] for m in messages] == ["task.created", "project.updated"]
    assert messages[0]["task"]["uuid"] == task["uuid"]
    assert messages[0]["task"]["project"]["tasks_count"] == 1
    assert set(messages[1]["changed"]) == {"status", "progress", "tasks_count"}
    assert messages[1]["project"]["tasks_count"] == 1
    ids = [created[0]["id"], *(m["id"] for m in messages)]
    changes = {
        "name": "Logos 2",
        "description": "new",
        "estimate_date": "2099-01-01",
        "price": "20",
        "urls": ["https://files.test/other.png"],
    }
    for field, value in changes.items():
        response = await app.fetch(
            "/tasks/batch_update", "POST", [{"task_id": task["uuid"], field: value}]
        )
        assert response.code == 200, response.body
        [message] = await receive(ws, 1)
        assert message["type"] == "task.updated"
        assert message["changed"] == [field]
        ids.append(message["id"])
        if field == "estimate_date":
            [project_event] = await receive(ws, 1)
            assert project_event["changed"] == ["estimate_date"]
            assert project_event["project"]["estimate_date"] == "2099-01-01"
            ids.append(project_event["id"])
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # The same value again changes nothing, so it sends nothing.
    await app.fetch("/tasks/batch_update", "POST", [{"task_id": task["uuid"], "price": "20"}])
    assert await silent(ws)
    ws.close()


async def test_a_batch_of_n_updates_sends_n_events(app: Any) -> None:
    project = await create_project(app)
    tasks = await create_tasks(app, *(task_item(project["uuid"], f"T{i}") for i in range(5)))
    ws = await connect(app, f"project_id={project['uuid']}")
    update = [{"task_id": t["uuid"], "name": f"Renamed {i}"} for i, t in enumerate(tasks)]
    assert (await app.fetch("/tasks/batch_update", "POST", update)).code == 200
    messages = await receive(ws, 5)
    assert [m["task"]["name"] for m in messages] == [f"Renamed {i}" for i in range(5)]
    assert all(m["changed"] == ["name"] for m in messages)
    assert await silent(ws)
    ws.close()


async def test_filters_deliver_only_matching_events(app: Any) -> None:
    one, two = await create_project(app, "One"), await create_project(app, "Two")
    [a] = await create_tasks(app, task_item(one["uuid"], "A"))
    [b] = await create_tasks(app, task_item(two["uuid"], "B"))
    by_task = await connect(app, f"task_id={b['uuid']}")
    by_project = await connect(app, f"project_id={one['uuid']}")
    for task in (a, b):
        await app.fetch("/tasks/batch_update", "POST", [{"task_id": task["uuid"], "name": "x"}])
    [only_b] = await receive(by_task, 1)
    assert only_b["task"]["uuid"] == b["uuid"]
    [only_a] = await receive(by_project, 1)
    assert only_a["task"]["uuid"] == a["uuid"]
    assert await silent(by_task) and await silent(by_project)
    by_task.close()
    by_project.close()


async def test_resume_with_since_replays_missed_events_in_order(app: Any) -> None:
    project = await create_project(app)
    [task] = await create_tasks(app, task_item(project["uuid"], "T"))
    ws = await connect(app, f"task_id={task['uuid']}")
    await app.fetch("/tasks/batch_update", "POST", [{"task_id": task["uuid"], "name": "1"}])
    [seen] = await receive(ws, 1)
    ws.close()
    for name in ("2", "3", "4"):
        await app.fetch("/tasks/batch_update", "POST", [{"task_id": task["uuid"], "name": name}])
    again = await connect(app, f"task_id={task['uuid']}&since={seen['id']}")
    missed = await receive(again, 3)
    assert [m["task"]["name"] for m in missed] == ["2", "3", "4"]
    assert [m["id"] for m in missed] == sorted(m["id"] for m in missed)
    assert all(m["id"] > seen["id"] for m in missed)
    await app.fetch("/tasks/batch_update", "POST", [{"task_id": task["uuid"], "name": "5"}])
    [live] = await receive(again, 1)
    assert live["task"]["name"] == "5" and live["id"] > missed[-1]["id"]
    assert await silent(again)
    again.close()


async def test_since_older_than_history_asks_for_resync(app: Any) -> None:
    await create_project(app)
    row = await app.services.db.fetchone("SELECT max(id) FROM event")
    await app.services.db.execute(
        "UPDATE event_horizon SET pruned_through = greatest(pruned_through, %s)", [row[0]]
    )
    ws = await connect(app, "since=0")
    [message] = await receive(ws, 1)
    assert message == {"type": "resync"}
    assert await ws.read_message() is None
    assert ws.close_code == 1000
    ws.close()


async def test_plain_http_request_gets_a_problem(app: Any) -> None:
    response = await app.fetch("/ws")
    assert response.code == 400
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["code"] == "invalid_json" or response.json()["status"] == 400


async def test_bad_filter_is_rejected_before_upgrade(app: Any) -> None:
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    response = await app.fetch("/ws?project_id=nope", headers=upgrade)
    assert response.code == 422
    assert "project_id" in response.json()["errors"]


async def test_out_of_order_commits_are_both_delivered_in_order(app: Any, settings: Any) -> None:
    one, two = await create_project(app, "One"), await create_project(app, "Two")
    ws = await connect(app)
    first, second = Database(settings.database_url), Database(settings.database_url)
    for db in (first, second):
        await db.start()
        while not db.available:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    release = asyncio.Event()

    async def slow_writer() -> None:
        async with first.transaction():
            await record(
                first, [Event("project.updated", uuid.UUID(one["uuid"]), changed=["name"])]
            )
            await release.wait()

    async def fast_writer() -> None:
        async with second.transaction():
            await record(
                second, [Event("project.updated", uuid.UUID(two["uuid"]), changed=["price"])]
            )

    slow = asyncio.ensure_future(slow_writer())
    await asyncio.sleep(0.2)
    fast = asyncio.ensure_future(fast_writer())
    await asyncio.sleep(0.3)
    # The later transaction cannot draw its id until the earlier one has committed.
    assert not fast.done()
    release.set()
    await asyncio.gather(slow, fast)
    # The feed may still be delivering the two project.created events when we connected.
    messages = [m for m in await receive(ws, 2) if m["type"] == "project.updated"]
    while len(messages) < 2:
        messages += [m for m in await receive(ws, 1) if m["type"] == "project.updated"]
    assert [m["project"]["uuid"] for m in messages] == [one["uuid"], two["uuid"]]
    assert messages[0]["id"] < messages[1]["id"]
    for db in (first, second):
        await db.stop()
    ws.close()


async def test_events_from_another_instance_arrive(app: Any, make_server: Any) -> None:
    other = await make_server()
    ws = await connect(app)
    project = await create_project(other)
    tasks = await create_tasks(other, *(task_item(project["uuid"], f"T{i}") for i in range(3)))
    messages = await receive(ws, 5)
    ids = [m["id"] for m in messages]
    assert ids == sorted(ids)
    got = [m["task"]["uuid"] for m in messages if m["type"] == "task.created"]
    assert got == [t["uuid"] for t in tasks]
    ws.close()


async def test_listener_reconnects_after_its_connection_is_killed(app: Any) -> None:
    ws = await connect(app)
    killed = await app.services.db.fetchone(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'satchel-listener'"
    )
    assert killed[0] >= 1
    project = await create_project(app)
    [message] = await receive(ws, 1, timeout=10)
    assert message["project"]["uuid"] == project["uuid"]
    ws.close()


async def test_a_client_that_never_reads_is_dropped_others_keep_up(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handlers.ws, "MAX_QUEUE", 1100)
    app = await make_server(max_body_bytes=32 * 1024 * 1024)
    host, port = app.url.removeprefix("http://").split(":")
    lazy = socket.socket()
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect((host, int(port)))
    lazy.sendall(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await asyncio.sleep(0.3)
    dropped_before = app.services.metrics.ws_dropped._value.get()
    reader = await connect(app)
    project = await create_project(app, price="1")
    await receive(reader, 1)
    # Large messages fill the lazy client's socket buffers quickly.
    for _ in range(3):
        batch = [task_item(project["uuid"], f"T{i}", description="d" * 5000) for i in range(1000)]
        assert (await app.fetch("/tasks/batch_create", "POST", batch)).code == 201
        messages = await receive(reader, 1001, timeout=20)
        assert all(m["type"] in ("task.created", "project.updated") for m in messages)
    for _ in range(100):
        if app.services.metrics.ws_dropped._value.get() > dropped_before:
            break
        await asyncio.sleep(0.05)
    assert app.services.metrics.ws_dropped._value.get() == dropped_before + 1
    lazy.close()
    reader.close()


async def test_pruning_drops_old_events_and_raises_the_horizon(app: Any) -> None:
    project = await create_project(app)
    await create_project(app)
    rows = await app.services.db.fetchall("SELECT id FROM event ORDER BY id")
    old, recent = rows[-2][0], rows[-1][0]
    await app.services.db.execute(
        "UPDATE event SET created_at = clock_timestamp() - interval '2 days' WHERE id <= %s", [old]
    )
    await app.services.feed.prune()
    left = await app.services.db.fetchall("SELECT id FROM event WHERE id <= %s", [recent])
    assert [row[0] for row in left] == [recent]
    horizon = await app.services.db.fetchone("SELECT pruned_through FROM event_horizon")
    assert horizon[0] >= old
    ws = await connect(app, f"since={old - 1}")
    assert await receive(ws, 1) == [{"type": "resync"}]
    ws.close()
    ws = await connect(app, f"since={old}&project_id={project['uuid']}")
    assert await silent(ws)
    ws.close()
