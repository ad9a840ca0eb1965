"""Pages: bounds of limit/offset, order by created_at then uuid, filters, constant query count."""

import pytest
from api_helpers import (
    MISSING_UUID,
    assert_problem,
    create_project,
    create_tasks,
    set_state,
    task_item,
)


async def seed_projects(app, count):
    """`count` projects straight in SQL, created one microsecond apart, in that order."""
    await app.services.db.execute(
        "INSERT INTO project (name, price, created_at, updated_at)"
        " SELECT 'p' || g, 100, now() + g * interval '1 microsecond', now()"
        " FROM generate_series(1, %s) g",
        [count],
    )
    for store in app.services.stores.values():
        store.forget_totals()


async def seed_tasks(app, project_ids, per_project):
    """`per_project` tasks for each project, with a mix of prices and dates, straight in SQL."""
    await app.services.db.execute(
        "INSERT INTO task (project_id, name, urls, price, estimate_date)"
        " SELECT p, 't' || g, ARRAY['https://files.test/' || g || '.png'],"
        "  CASE WHEN g %% 2 = 0 THEN 1 END, CASE WHEN g %% 3 = 0 THEN current_date + g END"
        " FROM unnest(%s::uuid[]) p, generate_series(1, %s) g",
        [project_ids, per_project],
    )
    for store in app.services.stores.values():
        store.forget_totals()


@pytest.mark.parametrize("path", ["/projects", "/tasks"])
async def test_an_empty_list_is_an_empty_page(app, path):
    r = await app.fetch(path)
    assert r.code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"items": [], "total": 0, "limit": 50, "offset": 0}


async def test_defaults_are_limit_50_offset_0(app):
    await seed_projects(app, 60)
    page = (await app.fetch("/projects")).json()
    assert (page["total"], page["limit"], page["offset"], len(page["items"])) == (60, 50, 0, 50)
    assert [p["name"] for p in page["items"]] == [f"p{i}" for i in range(1, 51)]


@pytest.mark.parametrize("path", ["/projects", "/tasks"])
@pytest.mark.parametrize(
    ("query", "key"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("limit=", "limit"),
        ("limit=1.5", "limit"),
        ("limit=99999999999999999999999", "limit"),
        ("offset=-1", "offset"),
        ("offset=abc", "offset"),
        ("offset=1e3", "offset"),
    ],
)
async def test_invalid_limit_or_offset_is_422_keyed_by_the_parameter(app, path, query, key):
    problem = assert_problem(await app.fetch(f"{path}?{query}"), 422, "validation_error")
    assert set(problem["errors"]) == {key}


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/projects?limit=%ff", "limit"),
        ("/tasks?offset=%c3%28", "offset"),
        ("/tasks?status=%ff", "status"),
        ("/tasks?project_id=%ed%a0%80", "project_id"),
    ],
)
async def test_a_parameter_that_is_not_utf8_is_422_keyed_by_its_name(app, path, key):
    problem = assert_problem(await app.fetch(path), 422, "validation_error")
    assert set(problem["errors"]) == {key}


async def test_both_bad_parameters_are_reported(app):
    problem = assert_problem(
        await app.fetch("/tasks?limit=0&offset=-5&status=done&project_id=x"),
        422,
        "validation_error",
    )
    assert set(problem["errors"]) == {"limit", "offset", "status", "project_id"}


async def test_limit_bounds_1_and_500_are_accepted(app):
    await seed_projects(app, 501)
    one = (await app.fetch("/projects?limit=1")).json()
    assert (len(one["items"]), one["limit"], one["total"]) == (1, 1, 501)
    most = (await app.fetch("/projects?limit=500&offset=1")).json()
    assert (len(most["items"]), most["limit"], most["offset"]) == (500, 500, 1)
    assert most["items"][-1]["name"] == "p501"


async def test_offset_beyond_the_end_is_an_empty_page_with_the_total(app):
    await seed_projects(app, 3)
    for offset in (3, 4, 1000000):
        page = (await app.fetch(f"/projects?offset={offset}&limit=2")).json()
        assert page == {"items": [], "total": 3, "limit": 2, "offset": offset}
    last = (await app.fetch("/projects?offset=2&limit=2")).json()
    assert [p["name"] for p in last["items"]] == ["p3"]


async def test_pages_walk_every_item_once_in_creation_order(app):
    created = [(await create_project(app, name=f"n{i}"))["uuid"] for i in range(7)]
    walked = []
    for offset in range(0, 8, 3):
        page = (await app.fetch(f"/projects?limit=3&offset={offset}")).json()
        assert page["total"] == 7
        walked += [p["uuid"] for p in page["items"]]
    assert walked == created


@pytest.mark.parametrize("table", ["project", "task"])
async def test_equal_created_at_is_ordered_by_uuid(app, table):
    project = await create_project(app)
    await create_tasks(app, *(task_item(project["uuid"], f"t{i}") for i in range(6)))
    await create_project(app, name="later")
    # Every row gets the same instant: only the uuid can order them.
    await app.services.db.execute(f"UPDATE {table} SET created_at = '2026-01-01T00:00:00Z'")
    for store in app.services.stores.values():
        store.forget_totals()
    path = "/projects" if table == "project" else "/tasks"
    items = (await app.fetch(f"{path}?limit=500")).json()["items"]
    uuids = [item["uuid"] for item in items]
    assert uuids == sorted(uuids)
    assert len(uuids) == (2 if table == "project" else 6)
    pages = [
        item["uuid"]
        for offset in range(0, len(uuids), 2)
        for item in (await app.fetch(f"{path}?limit=2&offset={offset}")).json()["items"]
    ]
    assert pages == uuids


async def test_tasks_filter_by_project_and_status(app):
    first = await create_project(app, name="first")
    second = await create_project(app, name="second")
    a1, a2, a3 = await create_tasks(app, *(task_item(first["uuid"], n) for n in ("a1", "a2", "a3")))
    (b1,) = await create_tasks(app, task_item(second["uuid"], "b1"))
    await set_state(app, a2["uuid"], "processing", 5)
    await set_state(app, b1["uuid"], "processing", 7)
    await set_state(app, a3["uuid"], "failed", 0, error="boom")

    async def names(query):
        page = (await app.fetch(f"/tasks?{query}")).json()
        return [t["name"] for t in page["items"]]

    assert await names(f"project_id={first['uuid']}") == ["a1", "a2", "a3"]
    assert await names(f"project_id={second['uuid']}") == ["b1"]
    assert await names("status=processing") == ["a2", "b1"]
    assert await names("status=failed") == ["a3"]
    assert await names("status=finished") == []
    assert await names(f"status=processing&project_id={first['uuid']}") == ["a2"]
    assert await names(f"project_id={first['uuid']}&limit=1&offset=2") == ["a3"]
    page = (await app.fetch(f"/tasks?project_id={first['uuid']}&limit=1")).json()
    assert (page["total"], [t["uuid"] for t in page["items"]]) == (3, [a1["uuid"]])
    page = (await app.fetch("/tasks?status=processing&limit=1&offset=1")).json()
    assert (page["total"], [t["name"] for t in page["items"]]) == (2, ["b1"])


async def test_unknown_project_filter_is_an_empty_page(app):
    project = await create_project(app)
    await create_tasks(app, task_item(project["uuid"]))
    page = (await app.fetch(f"/tasks?project_id={MISSING_UUID}")).json()
    assert page == {"items": [], "total": 0, "limit": 50, "offset": 0}


@pytest.mark.parametrize(
    ("query", "key"),
    [
        ("project_id=nope", "project_id"),
        ("project_id=", "project_id"),
        (f"project_id={MISSING_UUID}0", "project_id"),
        ("status=done", "status"),
        ("status=FINISHED", "status"),
        ("status=", "status"),
    ],
)
async def test_invalid_task_filters_are_422_keyed_by_the_parameter(app, query, key):
    problem = assert_problem(await app.fetch(f"/tasks?{query}"), 422, "validation_error")
    assert set(problem["errors"]) == {key}


async def _statements(app, path):
    """SQL statements one request costs when its page is not remembered (fewest over tries)."""
    db = app.services.db
    costs = []
    for _ in range(3):
        for store in app.services.stores.values():
            store.forget_pages()
        before = db.statements
        r = await app.fetch(path)
        assert r.code == 200, r.body
        costs.append(db.statements - before)
    return min(costs), r.json()


@pytest.mark.parametrize("path", ["/projects", "/tasks"])
async def test_a_page_of_1_costs_the_same_statements_as_a_page_of_50(app, path):
    await seed_projects(app, 60)
    rows = await app.services.db.fetchall("SELECT uuid::text FROM project")
    await seed_tasks(app, [row[0] for row in rows], 2)
    small, one = await _statements(app, f"{path}?limit=1")
    large, fifty = await _statements(app, f"{path}?limit=50")
    assert len(one["items"]) == 1
    assert len(fifty["items"]) == 50
    assert small == large
    assert 1 <= large <= 2


async def test_a_filtered_page_of_tasks_costs_no_more(app):
    await seed_projects(app, 30)
    rows = await app.services.db.fetchall("SELECT uuid::text FROM project")
    await seed_tasks(app, [row[0] for row in rows], 60)
    plain, _ = await _statements(app, "/tasks?limit=1")
    filtered, page = await _statements(
        app, f"/tasks?limit=50&status=initialized&project_id={rows[0][0]}"
    )
    assert len(page["items"]) == 50
    assert page["total"] == 60
    assert filtered == plain


async def test_the_shown_created_at_and_uuid_reproduce_the_listed_order(app):
    project = await create_project(app, price="100")
    items = [task_item(project["uuid"], f"T{i}") for i in range(30)]
    created = await create_tasks(app, *items)
    listed = (await app.fetch("/tasks?limit=100")).json()["items"]
    assert [t["uuid"] for t in listed] == [t["uuid"] for t in created]
    keys = [(t["created_at"], t["uuid"]) for t in listed]
    assert keys == sorted(keys)
