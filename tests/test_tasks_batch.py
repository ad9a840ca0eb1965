"""Tasks over HTTP: batch_create and batch_update, every field rule, atomicity, the price rule."""

import pytest
from api_helpers import (
    MISSING_UUID,
    TIMESTAMP,
    assert_problem,
    batch_update,
    create_project,
    create_tasks,
    set_state,
    task_item,
    today,
)

TASK_KEYS = {
    "uuid",
    "name",
    "description",
    "estimate_date",
    "price",
    "urls",
    "status",
    "progress",
    "archive_url",
    "error",
    "project",
    "created_at",
    "updated_at",
}


async def all_tasks(app, project_id=None):
    query = f"&project_id={project_id}" if project_id else ""
    return (await app.fetch(f"/tasks?limit=500{query}")).json()["items"]


async def test_batch_create_answers_201_with_every_task_in_input_order(app):
    project = await create_project(app, price="1500")
    names = ["Logos", "Fonts", "Banner", "Icons", "Avatars"]
    r = await app.fetch(
        "/tasks/batch_create",
        "POST",
        [
            task_item(
                project["uuid"],
                "Logos",
                price=300,
                description="Company logos",
                estimate_date=today(7),
                urls=["https://site.com/logo1.png", "https://site.com/logo2.png"],
            ),
            *(task_item(project["uuid"], name) for name in names[1:]),
        ],
    )
    assert r.code == 201, r.body
    items = r.json()["items"]
    assert [t["name"] for t in items] == names
    first = items[0]
    assert set(first) == TASK_KEYS
    assert first["description"] == "Company logos"
    assert first["estimate_date"] == today(7)
    assert first["price"] == "300.00"
    assert first["urls"] == ["https://site.com/logo1.png", "https://site.com/logo2.png"]
    assert (first["status"], first["progress"], first["archive_url"], first["error"]) == (
        "initialized",
        0,
        None,
        None,
    )
    assert TIMESTAMP.match(first["created_at"])
    assert first["project"]["uuid"] == project["uuid"]
    assert first["project"]["tasks_count"] == 5
    assert first["project"]["estimate_date"] == today(7)
    assert items[1]["price"] is None
    assert items[1]["description"] is None
    listed = await all_tasks(app, project["uuid"])
    assert [t["uuid"] for t in listed] == [t["uuid"] for t in items]


async def test_tasks_list_in_the_input_order_of_successive_batches(app):
    project = await create_project(app)
    order = ["z", "b", "y", "a", "x", "c", "w", "d", "v", "e"]
    first = await create_tasks(app, *(task_item(project["uuid"], n) for n in order))
    second = await create_tasks(app, *(task_item(project["uuid"], n * 2) for n in order))
    listed = await all_tasks(app)
    assert [t["uuid"] for t in listed] == [t["uuid"] for t in first + second]
    assert [t["name"] for t in listed] == order + [n * 2 for n in order]


async def test_get_task_embeds_its_project(app):
    project = await create_project(app)
    (task,) = await create_tasks(app, task_item(project["uuid"], "one"))
    r = await app.fetch(f"/tasks/{task['uuid']}")
    assert r.code == 200
    assert r.json() == task


async def test_a_task_may_use_the_project_price_exactly(app):
    project = await create_project(app, price="1000")
    tasks = await create_tasks(
        app,
        task_item(project["uuid"], "a", price="600.50"),
        task_item(project["uuid"], "b", price=399.5),
        task_item(project["uuid"], "c"),
    )
    assert [t["price"] for t in tasks] == ["600.50", "399.50", None]


async def _create_rejected(app, owner, **fields):
    """POST one item with `fields` overriding a valid one; return the errors of item 0."""
    item = task_item(owner["uuid"], "t")
    item.update(fields)
    r = await app.fetch("/tasks/batch_create", "POST", [item])
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"0"}
    assert await all_tasks(app) == []
    return problem["errors"]["0"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", ""),
        ("name", "   "),
        ("name", "n" * 256),
        ("name", None),
        ("name", 7),
        ("description", "d" * 10001),
        ("description", 7),
        ("price", -1),
        ("price", "1.001"),
        ("price", 1000000000000),
        ("price", True),
        ("price", "NaN"),
        ("price", "Infinity"),
        ("price", "ten"),
        ("estimate_date", today(-1)),
        ("estimate_date", "2027-02-30"),
        ("estimate_date", "2027/01/15"),
        ("estimate_date", "15.01.2027"),
        ("estimate_date", "20270115"),
        ("estimate_date", "2027-01-15T00:00:00"),
        ("estimate_date", "tomorrow"),
        ("estimate_date", 20270115),
        ("urls", []),
        ("urls", "https://a.com/x.png"),
        ("urls", None),
        ("urls", [f"https://a.com/{i}.png" for i in range(101)]),
        ("project_id", "not-a-uuid"),
        ("project_id", 5),
        ("project_id", None),
        ("project_id", MISSING_UUID),
    ],
)
async def test_batch_create_rejects_invalid_fields(app, field, value):
    project = await create_project(app)
    errors = await _create_rejected(app, project, **{field: value})
    assert set(errors) == {field}


@pytest.mark.parametrize("field", ["name", "urls", "project_id"])
async def test_batch_create_requires_name_urls_and_project(app, field):
    project = await create_project(app)
    item = task_item(project["uuid"])
    del item[field]
    r = await app.fetch("/tasks/batch_create", "POST", [item])
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]["0"]) == {field}


async def test_batch_create_accepts_today_100_urls_and_2048_character_urls(app):
    project = await create_project(app)
    long_url = "https://a.com/" + "p" * (2048 - len("https://a.com/") - 4) + ".png"
    assert len(long_url) == 2048
    hundred = [f"http://a.com/f{i}.png" for i in range(100)]
    tasks = await create_tasks(
        app,
        task_item(project["uuid"], "today", estimate_date=today()),
        task_item(project["uuid"], "long", urls=[long_url]),
        task_item(project["uuid"], "many", urls=hundred),
        task_item(project["uuid"], "query", urls=["https://a.com/dl/report.pdf?sig=1#frag"]),
    )
    assert tasks[0]["estimate_date"] == today()
    assert tasks[1]["urls"] == [long_url]
    assert tasks[2]["urls"] == hundred


@pytest.mark.parametrize(
    "bad",
    [
        "/relative/file.png",
        "file.png",
        "ftp://a.com/file.png",
        "file:///etc/passwd",
        "https://a.com/",
        "https://a.com",
        "https://a.com/dir/",
        "https:///file.png",
        "https://a.com/" + "p" * 2040 + ".png",
        "https://a.com/with space.png",
        "",
        7,
        None,
    ],
)
async def test_each_invalid_url_is_keyed_by_its_index(app, bad):
    project = await create_project(app)
    errors = await _create_rejected(app, project, urls=["https://a.com/ok.png", bad])
    assert set(errors) == {"urls"}
    assert set(errors["urls"]) == {"1"}
    assert errors["urls"]["1"]


async def test_duplicate_urls_are_keyed_by_the_index_of_the_duplicate(app):
    project = await create_project(app)
    urls = [
        "https://a.com/a.png",
        "https://a.com/b.png",
        "https://a.com/a.png",
        "https://a.com/b.png",
    ]
    errors = await _create_rejected(app, project, urls=urls)
    assert set(errors["urls"]) == {"2", "3"}


@pytest.mark.parametrize("field", ["status", "progress", "archive_url", "error", "uuid", "project"])
async def test_batch_create_rejects_read_only_fields_by_name(app, field):
    project = await create_project(app)
    errors = await _create_rejected(app, project, **{field: "finished"})
    assert set(errors) == {field}


async def test_batch_create_rejects_unknown_fields_by_name(app):
    project = await create_project(app)
    errors = await _create_rejected(app, project, colour="red")
    assert set(errors) == {"colour"}


async def test_one_bad_item_writes_nothing_and_every_bad_index_is_named(app):
    project = await create_project(app)
    items = [
        task_item(project["uuid"], "ok"),
        task_item(project["uuid"], "bad-url", urls=["https://a.com/"]),
        task_item(project["uuid"], "ok too"),
        task_item(MISSING_UUID, "no-project"),
        "not an object",
        task_item(project["uuid"], ""),
    ]
    r = await app.fetch("/tasks/batch_create", "POST", items)
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"1", "3", "4", "5"}
    assert set(problem["errors"]["1"]) == {"urls"}
    assert set(problem["errors"]["3"]) == {"project_id"}
    assert set(problem["errors"]["5"]) == {"name"}
    assert problem["detail"] == "4 of 6 tasks are invalid"
    assert (problem["type"], problem["title"]) == ("/errors/validation", "Validation failed")
    assert await all_tasks(app) == []
    assert (await app.fetch(f"/projects/{project['uuid']}")).json()["tasks_count"] == 0


async def test_unknown_project_is_422_on_project_id_and_nothing_is_written(app):
    project = await create_project(app)
    r = await app.fetch(
        "/tasks/batch_create",
        "POST",
        [task_item(project["uuid"], "fine"), task_item(MISSING_UUID, "orphan")],
    )
    problem = assert_problem(r, 422, "validation_error")
    assert problem["errors"] == {"1": {"project_id": [problem["errors"]["1"]["project_id"][0]]}}
    assert await all_tasks(app) == []


async def test_price_sum_violation_is_reported_on_every_priced_item_of_the_project(app):
    project = await create_project(app, price="1000")
    other = await create_project(app, name="Other", price="50")
    await create_tasks(app, task_item(project["uuid"], "existing", price="200"))
    r = await app.fetch(
        "/tasks/batch_create",
        "POST",
        [
            task_item(project["uuid"], "a", price="500"),
            task_item(project["uuid"], "unpriced"),
            task_item(other["uuid"], "elsewhere", price="50"),
            task_item(project["uuid"], "b", price="300.01"),
        ],
    )
    problem = assert_problem(r, 422, "validation_error")
    message = "Sum of task prices (1000.01) exceeds project price (1000.00)."
    assert problem["errors"] == {"0": {"price": [message]}, "3": {"price": [message]}}
    assert [t["name"] for t in await all_tasks(app)] == ["existing"]


async def test_batch_create_of_a_single_over_priced_task(app):
    project = await create_project(app, price="10")
    r = await app.fetch(
        "/tasks/batch_create", "POST", [task_item(project["uuid"], "big", price="10.01")]
    )
    problem = assert_problem(r, 422, "validation_error")
    assert problem["errors"]["0"]["price"] == [
        "Sum of task prices (10.01) exceeds project price (10.00)."
    ]
    assert problem["detail"] == "1 of 1 task is invalid"


@pytest.mark.parametrize("path", ["/tasks/batch_create", "/tasks/batch_update"])
async def test_batch_bounds(app, path):
    empty = await app.fetch(path, "POST", [])
    problem = assert_problem(empty, 422, "validation_error")
    assert problem["errors"]
    too_many = await app.fetch(path, "POST", [{}] * 1001)
    assert_problem(too_many, 413, "payload_too_large")
    wrong_type = await app.fetch(path, "POST", {"items": []})
    assert_problem(wrong_type, 400, "invalid_json")


async def test_a_batch_of_1000_items_is_accepted(app):
    project = await create_project(app)
    items = [task_item(project["uuid"], f"t{i}") for i in range(1000)]
    tasks = await create_tasks(app, *items)
    assert [t["name"] for t in tasks] == [f"t{i}" for i in range(1000)]
    page = (await app.fetch("/tasks?limit=500&offset=500")).json()
    assert page["total"] == 1000
    assert [t["name"] for t in page["items"]] == [f"t{i}" for i in range(500, 1000)]


# batch_update


async def _one_task(app, **fields):
    project = await create_project(app, price="1000")
    item = task_item(
        project["uuid"],
        "Logos",
        description="About logos",
        estimate_date=today(10),
        price="100",
        urls=["https://a.com/logo.png"],
    )
    item.update(fields)
    (task,) = await create_tasks(app, item)
    return task


async def test_batch_update_changes_only_the_given_fields(app):
    task = await _one_task(app)
    r = await batch_update(app, [{"task_id": task["uuid"], "name": "  Renamed  "}])
    assert r.code == 200, r.body
    (updated,) = r.json()["items"]
    assert updated["name"] == "Renamed"
    for key in (
        "description",
        "estimate_date",
        "price",
        "urls",
        "status",
        "progress",
        "created_at",
        "uuid",
    ):
        assert updated[key] == task[key], key
    assert (await app.fetch(f"/tasks/{task['uuid']}")).json() == updated


async def test_batch_update_sets_every_updatable_field(app):
    task = await _one_task(app)
    change = {
        "name": "New",
        "description": "New text",
        "estimate_date": today(20),
        "price": 250.5,
        "urls": ["https://b.com/new.zip"],
    }
    r = await batch_update(app, [{"task_id": task["uuid"], **change}])
    assert r.code == 200, r.body
    (updated,) = r.json()["items"]
    assert {k: updated[k] for k in change} == {**change, "price": "250.50"}
    assert updated["project"]["estimate_date"] == today(20)


async def test_null_clears_description_estimate_date_and_price(app):
    task = await _one_task(app)
    r = await batch_update(
        app, [{"task_id": task["uuid"], "description": None, "estimate_date": None, "price": None}]
    )
    assert r.code == 200, r.body
    (updated,) = r.json()["items"]
    assert (updated["description"], updated["estimate_date"], updated["price"]) == (None,) * 3
    assert updated["name"] == task["name"]
    assert updated["urls"] == task["urls"]
    assert updated["project"]["estimate_date"] is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", None),
        ("urls", None),
        ("name", " "),
        ("urls", []),
        ("urls", ["ftp://a.com/x.png"]),
        ("price", "-5"),
        ("price", "0.125"),
        ("estimate_date", today(-1)),
        ("description", "d" * 10001),
        ("status", "finished"),
        ("progress", 100),
        ("archive_url", "https://x.com/a.zip"),
        ("error", None),
        ("project_id", MISSING_UUID),
        ("colour", "red"),
    ],
)
async def test_batch_update_rejects_invalid_fields_and_changes_nothing(app, field, value):
    task = await _one_task(app)
    r = await batch_update(app, [{"task_id": task["uuid"], field: value}])
    problem = assert_problem(r, 422, "validation_error")
    assert problem["errors"] == {"0": {field: problem["errors"]["0"][field]}}
    assert (await app.fetch(f"/tasks/{task['uuid']}")).json() == task


@pytest.mark.parametrize("task_id", [MISSING_UUID, "nope", None, 5])
async def test_unknown_or_malformed_task_id_is_422_on_task_id(app, task_id):
    task = await _one_task(app)
    r = await batch_update(
        app, [{"task_id": task["uuid"], "name": "changed"}, {"task_id": task_id, "name": "x"}]
    )
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"1"}
    assert set(problem["errors"]["1"]) == {"task_id"}
    assert (await app.fetch(f"/tasks/{task['uuid']}")).json()["name"] == task["name"]


async def test_task_id_is_required(app):
    r = await batch_update(app, [{"name": "x"}])
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]["0"]) == {"task_id"}


async def test_the_same_task_id_twice_is_invalid(app):
    task = await _one_task(app)
    r = await batch_update(
        app,
        [
            {"task_id": task["uuid"], "name": "one"},
            {"task_id": task["uuid"], "name": "two"},
        ],
    )
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"0", "1"}
    assert set(problem["errors"]["0"]) == {"task_id"}
    assert set(problem["errors"]["1"]) == {"task_id"}
    assert (await app.fetch(f"/tasks/{task['uuid']}")).json()["name"] == task["name"]


async def test_batch_update_returns_items_in_input_order(app):
    project = await create_project(app)
    tasks = await create_tasks(app, *(task_item(project["uuid"], n) for n in "abcde"))
    order = [tasks[i] for i in (3, 0, 4, 1, 2)]
    r = await batch_update(app, [{"task_id": t["uuid"], "description": t["name"]} for t in order])
    assert r.code == 200, r.body
    assert [t["uuid"] for t in r.json()["items"]] == [t["uuid"] for t in order]
    assert [t["description"] for t in r.json()["items"]] == [t["name"] for t in order]
    # The list keeps creation order, not update order.
    assert [t["name"] for t in await all_tasks(app)] == list("abcde")


async def test_changing_urls_starts_a_new_archive(app):
    project = await create_project(app)
    done, failed = await create_tasks(
        app, task_item(project["uuid"], "done"), task_item(project["uuid"], "failed")
    )
    await set_state(app, done["uuid"], "finished", 100, archive_key="x")
    await set_state(app, failed["uuid"], "failed", 30, error="https://files.test/failed.png: 404")
    before = (await app.fetch(f"/tasks/{done['uuid']}")).json()
    assert before["status"] == "finished"
    assert before["archive_url"]
    r = await batch_update(
        app,
        [
            {"task_id": done["uuid"], "urls": ["https://files.test/other.png"]},
            {"task_id": failed["uuid"], "urls": ["https://files.test/fixed.png"]},
        ],
    )
    assert r.code == 200, r.body
    for task in r.json()["items"]:
        assert (task["status"], task["progress"], task["archive_url"], task["error"]) == (
            "initialized",
            0,
            None,
            None,
        )
    assert r.json()["items"][0]["urls"] == ["https://files.test/other.png"]
    assert (await app.fetch(f"/tasks/{done['uuid']}")).json()["status"] == "initialized"


async def test_same_urls_or_other_fields_keep_the_archive(app):
    project = await create_project(app)
    (task,) = await create_tasks(app, task_item(project["uuid"], "done"))
    await set_state(app, task["uuid"], "finished", 100, archive_key="x")
    r = await batch_update(
        app, [{"task_id": task["uuid"], "urls": task["urls"], "name": "Renamed", "price": 5}]
    )
    assert r.code == 200, r.body
    (updated,) = r.json()["items"]
    assert (updated["status"], updated["progress"], updated["error"]) == ("finished", 100, None)
    assert updated["archive_url"]
    assert updated["name"] == "Renamed"


async def test_reordered_urls_are_a_different_list(app):
    project = await create_project(app)
    urls = ["https://files.test/a.png", "https://files.test/b.png"]
    (task,) = await create_tasks(app, task_item(project["uuid"], "done", urls=urls))
    await set_state(app, task["uuid"], "finished", 100, archive_key="x")
    r = await batch_update(app, [{"task_id": task["uuid"], "urls": urls[::-1]}])
    assert r.code == 200, r.body
    assert r.json()["items"][0]["status"] == "initialized"


async def test_batch_update_keeps_the_price_rule(app):
    project = await create_project(app, price="1000")
    a, b, _free = await create_tasks(
        app,
        task_item(project["uuid"], "a", price="400"),
        task_item(project["uuid"], "b", price="400"),
        task_item(project["uuid"], "free"),
    )
    r = await batch_update(app, [{"task_id": a["uuid"], "price": "700"}])
    problem = assert_problem(r, 422, "validation_error")
    assert problem["errors"] == {
        "0": {"price": ["Sum of task prices (1100.00) exceeds project price (1000.00)."]}
    }
    # Lowering one task while raising another fits when the new sum fits.
    r = await batch_update(
        app, [{"task_id": a["uuid"], "price": "700"}, {"task_id": b["uuid"], "price": "300"}]
    )
    assert r.code == 200, r.body
    assert [t["price"] for t in r.json()["items"]] == ["700.00", "300.00"]
    # Clearing a price frees its share.
    r = await batch_update(
        app, [{"task_id": b["uuid"], "price": None}, {"task_id": a["uuid"], "price": "1000"}]
    )
    assert r.code == 200, r.body
    r = await batch_update(
        app, [{"task_id": b["uuid"], "price": "0.01"}, {"task_id": a["uuid"], "name": "rename"}]
    )
    problem = assert_problem(r, 422, "validation_error")
    assert problem["errors"] == {
        "0": {"price": ["Sum of task prices (1000.01) exceeds project price (1000.00)."]}
    }
    prices = [t["price"] for t in await all_tasks(app)]
    assert prices == ["1000.00", None, None]


async def test_archive_link_is_409_until_finished_then_a_redirect(app):
    project = await create_project(app)
    (task,) = await create_tasks(app, task_item(project["uuid"], "t"))
    r = await app.fetch(f"/tasks/{task['uuid']}/archive")
    assert_problem(r, 409, "conflict")
    await set_state(app, task["uuid"], "processing", 50)
    assert_problem(await app.fetch(f"/tasks/{task['uuid']}/archive"), 409, "conflict")
    await set_state(app, task["uuid"], "finished", 100, archive_key="archives/t.zip")
    r = await app.fetch(f"/tasks/{task['uuid']}/archive")
    assert r.code == 302
    assert "archives/t.zip" in r.headers["Location"]
    assert r.headers["Location"].startswith("http")
    shown = (await app.fetch(f"/tasks/{task['uuid']}")).json()["archive_url"]
    assert "archives/t.zip" in shown
