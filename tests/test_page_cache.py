"""Remembered list pages: never stale for the instance's own writes or others' events."""

from __future__ import annotations

import asyncio
from typing import Any

from api_helpers import create_project, create_tasks, task_item


async def test_a_remembered_page_is_served_without_a_query(app: Any) -> None:
    await create_project(app)
    first = await app.fetch("/projects")
    before = app.services.db.statements
    again = await app.fetch("/projects")
    assert app.services.db.statements == before
    assert again.json() == first.json()


async def test_own_writes_show_at_once(app: Any) -> None:
    project = await create_project(app, price="100")
    assert (await app.fetch("/projects")).json()["items"][0]["tasks_count"] == 0
    [task] = await create_tasks(app, task_item(project["uuid"], "T", price="5"))
    page = (await app.fetch("/projects")).json()
    assert page["items"][0]["tasks_count"] == 1
    update = [{"task_id": task["uuid"], "name": "Renamed"}]
    assert (await app.fetch("/tasks/batch_update", "POST", update)).code == 200
    assert (await app.fetch("/tasks")).json()["items"][0]["name"] == "Renamed"
    await create_project(app, name="Second")
    assert (await app.fetch("/projects")).json()["total"] == 2


async def test_another_instances_writes_show_once_their_event_arrives(
    app: Any, make_server: Any
) -> None:
    other = await make_server()
    project = await create_project(app)
    assert (await app.fetch("/projects")).json()["items"][0]["tasks_count"] == 0
    await create_tasks(other, task_item(project["uuid"], "Elsewhere"))
    for _ in range(100):
        if (await app.fetch("/projects")).json()["items"][0]["tasks_count"] == 1:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the other instance's task never showed")


async def test_a_zero_ttl_remembers_nothing(make_server: Any) -> None:
    app = await make_server(page_cache_ttl=0.0)
    await create_project(app)
    await app.fetch("/projects")
    before = app.services.db.statements
    await app.fetch("/projects")
    assert app.services.db.statements == before + 1
