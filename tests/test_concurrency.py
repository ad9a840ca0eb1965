"""The price rule under concurrency: many clients racing batch_create and batch_update."""

import asyncio
import json
import random
from decimal import Decimal

import tornado.httpclient
from api_helpers import create_project, create_tasks, task_item

CLIENTS = 64


def _price(rng):
    return None if rng.random() < 0.2 else f"{rng.randint(1000, 25000) / 100:.2f}"


def _requests(rng, projects, seeded):
    """A deterministic mix of batch_create and batch_update bodies over both projects."""
    requests = []
    for n in range(CLIENTS):
        if n % 2 == 0:
            items = [
                task_item(rng.choice(projects)["uuid"], f"c{n}-{i}", price=_price(rng))
                for i in range(rng.randint(1, 3))
            ]
            requests.append(("/tasks/batch_create", items))
        else:
            chosen = rng.sample(seeded, rng.randint(1, 3))
            items = [{"task_id": task["uuid"], "price": _price(rng)} for task in chosen]
            if rng.random() < 0.3:
                items[0]["name"] = f"renamed by {n}"
            requests.append(("/tasks/batch_update", items))
    return requests


async def _send_all(url, requests):
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=CLIENTS + 10)
    try:
        return await asyncio.gather(
            *(
                client.fetch(
                    url + path,
                    method="POST",
                    body=json.dumps(items),
                    headers={"Content-Type": "application/json"},
                    raise_error=False,
                    request_timeout=60,
                )
                for path, items in requests
            )
        )
    finally:
        client.close()


def _money(value):
    return None if value is None else Decimal(value)


async def test_concurrent_batches_never_break_the_price_rule(app):
    rng = random.Random(20261203)
    projects = [await create_project(app, "big", "1000"), await create_project(app, "small", "300")]
    seeded = await create_tasks(
        app, *(task_item(projects[i % 2]["uuid"], f"seed{i}") for i in range(12))
    )
    requests = _requests(rng, projects, seeded)
    replies = await _send_all(app.url, requests)

    codes = [reply.code for reply in replies]
    assert [c for c in codes if c >= 500] == [], [r.body for r in replies if r.code >= 500]
    created_count = {p["uuid"]: 0 for p in projects}
    updated_to = {task["uuid"]: {None} for task in seeded}
    for (path, items), reply in zip(requests, replies, strict=True):
        body = json.loads(reply.body)
        if reply.code == 422:
            # Every item here is valid on its own: the only possible reason is the price rule.
            for errors in body["errors"].values():
                assert set(errors) == {"price"}, body
                assert "exceeds project price" in errors["price"][0]
            continue
        expected = 201 if path.endswith("create") else 200
        assert reply.code == expected, reply.body
        assert [_money(t["price"]) for t in body["items"]] == [_money(i["price"]) for i in items]
        for item, task in zip(items, body["items"], strict=True):
            if "task_id" in item:
                assert task["uuid"] == item["task_id"]
                updated_to[task["uuid"]].add(_money(item["price"]))
            else:
                assert task["project"]["uuid"] == item["project_id"]
                created_count[item["project_id"]] += 1
    assert codes.count(422) > 0, "the load never reached a project's price"
    assert codes.count(201) > 0
    assert codes.count(200) > 0

    db = app.services.db
    over = await db.fetchall(
        "SELECT p.uuid, p.price, sum(t.price) FROM project p JOIN task t ON t.project_id = p.uuid"
        " GROUP BY p.uuid HAVING sum(t.price) > p.price"
    )
    assert over == []
    for project in projects:
        row = await db.fetchone(
            "SELECT count(*) FROM task WHERE project_id = %s", [project["uuid"]]
        )
        assert row is not None
        assert row[0] == 6 + created_count[project["uuid"]]
    for task in seeded:
        row = await db.fetchone("SELECT price FROM task WHERE uuid = %s", [task["uuid"]])
        assert row is not None
        assert row[0] in updated_to[task["uuid"]]
    for project in projects:
        shown = (await app.fetch(f"/projects/{project['uuid']}")).json()
        assert shown["tasks_count"] == 6 + created_count[project["uuid"]]
