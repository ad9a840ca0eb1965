"""Projects over HTTP: creation, validation of every field, and the aggregates from SQL."""

import pytest
from api_helpers import (
    TIMESTAMP,
    UUID,
    assert_problem,
    create_project,
    create_tasks,
    set_state,
    task_item,
    today,
)

PROJECT_KEYS = {
    "uuid",
    "name",
    "description",
    "price",
    "estimate_date",
    "status",
    "progress",
    "tasks_count",
    "created_at",
    "updated_at",
}
NO_AGGREGATES = {"estimate_date": None, "status": None, "progress": None, "tasks_count": 0}


def aggregates(project):
    return {key: project[key] for key in NO_AGGREGATES}


async def test_create_answers_201_with_location_and_the_project(app):
    r = await app.fetch(
        "/projects", "POST", {"name": "  Site redesign ", "description": "New look", "price": 1500}
    )
    assert r.code == 201, r.body
    project = r.json()
    assert set(project) == PROJECT_KEYS
    assert UUID.match(project["uuid"])
    assert project["name"] == "Site redesign"
    assert project["description"] == "New look"
    assert project["price"] == "1500.00"
    assert aggregates(project) == NO_AGGREGATES
    assert TIMESTAMP.match(project["created_at"])
    assert TIMESTAMP.match(project["updated_at"])
    assert r.headers["Location"] == f"/projects/{project['uuid']}"
    again = await app.fetch(r.headers["Location"])
    assert again.code == 200
    assert again.json() == project


async def test_description_is_optional_and_nullable(app):
    assert (await create_project(app))["description"] is None
    assert (await create_project(app, description=None))["description"] is None
    assert (await create_project(app, description="d" * 10000))["description"] == "d" * 10000


async def test_get_by_uppercase_uuid_finds_the_project(app):
    project = await create_project(app)
    r = await app.fetch(f"/projects/{project['uuid'].upper()}")
    assert r.code == 200
    assert r.json()["uuid"] == project["uuid"]


@pytest.mark.parametrize(
    ("price", "shown"),
    [
        (0, "0.00"),
        (1500, "1500.00"),
        (12.5, "12.50"),
        (0.01, "0.01"),
        ("1500", "1500.00"),
        ("19.9", "19.90"),
        (" 7.25 ", "7.25"),
        (999999999999.99, "999999999999.99"),
        ("999999999999.99", "999999999999.99"),
    ],
)
async def test_price_accepts_numbers_and_numeric_strings_exactly(app, price, shown):
    assert (await create_project(app, price=price))["price"] == shown


@pytest.mark.parametrize(
    "price",
    [
        -1,
        "-0.01",
        1.005,
        "1.005",
        0.001,
        1000000000000,
        "1000000000000",
        "1000000000000.00",
        True,
        False,
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "abc",
        "",
        "1,000",
        [],
        {},
        None,
    ],
)
async def test_price_rejects_what_is_not_exact_money(app, price):
    r = await app.fetch("/projects", "POST", {"name": "P", "price": price})
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"price"}
    assert (await app.fetch("/projects")).json()["total"] == 0


async def test_price_and_name_are_required(app):
    r = await app.fetch("/projects", "POST", {})
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"name", "price"}


@pytest.mark.parametrize(
    "name", ["", "   ", "\t\n", "x" * 256, " " + "x" * 256 + " ", 5, None, ["a"]]
)
async def test_name_must_be_1_to_255_characters_after_trimming(app, name):
    r = await app.fetch("/projects", "POST", {"name": name, "price": 1})
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"name"}


async def test_name_of_255_characters_is_kept_and_surrounding_space_trimmed(app):
    assert (await create_project(app, name="  " + "x" * 255 + "  "))["name"] == "x" * 255


@pytest.mark.parametrize("description", ["d" * 10001, 5, ["d"]])
async def test_description_over_10000_characters_or_not_text_is_rejected(app, description):
    r = await app.fetch("/projects", "POST", {"name": "P", "price": 1, "description": description})
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"description"}


async def test_unknown_fields_are_rejected_by_name(app):
    r = await app.fetch("/projects", "POST", {"name": "P", "price": 1, "colour": "red", "x": 1})
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"colour", "x"}


@pytest.mark.parametrize(
    "field",
    ["uuid", "status", "progress", "tasks_count", "estimate_date", "created_at", "updated_at"],
)
async def test_read_only_fields_are_rejected_by_name(app, field):
    r = await app.fetch("/projects", "POST", {"name": "P", "price": 1, field: None})
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {field}
    assert (await app.fetch("/projects")).json()["total"] == 0


async def _views(app, project_id):
    """The project as GET /projects, GET /projects/{uuid} and GET /tasks each show it."""
    page = (await app.fetch("/projects?limit=500")).json()["items"]
    listed = next(p for p in page if p["uuid"] == project_id)
    single = (await app.fetch(f"/projects/{project_id}")).json()
    tasks = (await app.fetch(f"/tasks?project_id={project_id}")).json()["items"]
    embedded = [task["project"] for task in tasks]
    return [listed, single, *embedded]


async def _assert_aggregates(app, project_id, **expected):
    views = await _views(app, project_id)
    for view in views:
        assert aggregates(view) == expected, view
    for task in (await app.fetch(f"/tasks?project_id={project_id}")).json()["items"]:
        single = (await app.fetch(f"/tasks/{task['uuid']}")).json()
        assert aggregates(single["project"]) == expected


async def test_aggregates_of_a_project_without_tasks_are_null_and_zero(app):
    empty = await create_project(app, name="Empty")
    busy = await create_project(app, name="Busy")
    await create_tasks(app, task_item(busy["uuid"], estimate_date=today(3)))
    await _assert_aggregates(app, empty["uuid"], **NO_AGGREGATES)


async def test_aggregates_follow_the_lowest_status_and_smallest_progress(app):
    project = await create_project(app)
    other = await create_project(app, name="Other")
    a, b, c, d = await create_tasks(app, *(task_item(project["uuid"], n) for n in "abcd"))
    # Another project's tasks must not leak into this one's aggregates.
    (stray,) = await create_tasks(app, task_item(other["uuid"], "stray"))
    await set_state(app, stray["uuid"], "finished", 100, archive_key="k")
    expect = {"estimate_date": None, "tasks_count": 4}
    await _assert_aggregates(app, project["uuid"], status="initialized", progress=0, **expect)

    await set_state(app, a["uuid"], "processing", 40)
    await set_state(app, b["uuid"], "failed", 10, error="https://files.test/b.png: 404")
    await set_state(app, c["uuid"], "finished", 100, archive_key="archives/c.zip")
    await _assert_aggregates(app, project["uuid"], status="initialized", progress=0, **expect)

    await set_state(app, d["uuid"], "processing", 70)
    await _assert_aggregates(app, project["uuid"], status="processing", progress=10, **expect)

    await set_state(app, a["uuid"], "finished", 100, archive_key="archives/a.zip")
    await set_state(app, d["uuid"], "finished", 100, archive_key="archives/d.zip")
    await _assert_aggregates(app, project["uuid"], status="failed", progress=10, **expect)

    await set_state(app, b["uuid"], "finished", 100, archive_key="archives/b.zip")
    await _assert_aggregates(app, project["uuid"], status="finished", progress=100, **expect)
    await _assert_aggregates(
        app, other["uuid"], status="finished", progress=100, estimate_date=None, tasks_count=1
    )


async def test_estimate_date_is_the_latest_of_the_tasks_and_null_without_any(app):
    project = await create_project(app)
    await create_tasks(app, task_item(project["uuid"], "undated"))
    base = {"status": "initialized", "progress": 0}
    await _assert_aggregates(app, project["uuid"], estimate_date=None, tasks_count=1, **base)

    await create_tasks(
        app,
        task_item(project["uuid"], "soon", estimate_date=today(5)),
        task_item(project["uuid"], "late", estimate_date=today(40)),
        task_item(project["uuid"], "today", estimate_date=today()),
    )
    await _assert_aggregates(app, project["uuid"], estimate_date=today(40), tasks_count=4, **base)


async def test_a_page_of_projects_carries_each_projects_own_aggregates(app):
    first = await create_project(app, name="first")
    second = await create_project(app, name="second")
    third = await create_project(app, name="third")
    (f1,) = await create_tasks(app, task_item(first["uuid"], "f1", estimate_date=today(2)))
    await create_tasks(
        app,
        task_item(second["uuid"], "s1", estimate_date=today(9)),
        task_item(second["uuid"], "s2"),
    )
    await set_state(app, f1["uuid"], "processing", 55)
    page = (await app.fetch("/projects")).json()
    assert page["total"] == 3
    assert [aggregates(p) for p in page["items"]] == [
        {"estimate_date": today(2), "status": "processing", "progress": 55, "tasks_count": 1},
        {"estimate_date": today(9), "status": "initialized", "progress": 0, "tasks_count": 2},
        NO_AGGREGATES,
    ]
    assert [p["uuid"] for p in page["items"]] == [first["uuid"], second["uuid"], third["uuid"]]
