"""Small client-side helpers shared by the REST tests: create things, check problem bodies."""

from __future__ import annotations

import datetime
import re
from typing import Any

PROBLEM_TYPE = "application/problem+json"
PROBLEM_KEYS = {"type", "title", "status", "code", "detail", "errors", "request_id"}
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MISSING_UUID = "00000000-0000-4000-8000-000000000000"


def today(days: int = 0) -> str:
    """The UTC date `days` from today, as the contract writes dates."""
    return (datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=days)).isoformat()


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    """Check an RFC 9457 problem response as the contract shapes it; return its body."""
    assert response.code == status, (response.code, response.body)
    assert response.headers["Content-Type"].split(";")[0] == PROBLEM_TYPE
    problem = response.json()
    assert set(problem) <= PROBLEM_KEYS, problem
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["type"].startswith("/errors/")
    assert isinstance(problem["title"], str)
    assert problem["title"]
    assert problem["request_id"] == response.headers["X-Request-ID"]
    assert ("errors" in problem) == (status == 422), problem
    return problem  # type: ignore[no-any-return]


def task_item(project_id: str, name: str = "Task", **fields: Any) -> dict[str, Any]:
    """A valid batch_create item for `project_id`; `fields` override or add."""
    slug = re.sub(r"\W+", "-", name) or "file"
    return {
        "name": name,
        "urls": [f"https://files.test/{slug}.png"],
        "project_id": project_id,
        **fields,
    }


async def create_project(app: Any, name: str = "Site", price: Any = "1000", **fields: Any) -> Any:
    """POST a project and return it."""
    response = await app.fetch("/projects", "POST", {"name": name, "price": price, **fields})
    assert response.code == 201, response.body
    return response.json()


async def create_tasks(app: Any, *items: dict[str, Any]) -> list[Any]:
    """batch_create `items` and return the created tasks."""
    response = await app.fetch("/tasks/batch_create", "POST", list(items))
    assert response.code == 201, response.body
    return response.json()["items"]  # type: ignore[no-any-return]


async def set_state(
    app: Any,
    task_id: str,
    status: str,
    progress: int,
    *,
    archive_key: str | None = None,
    error: str | None = None,
) -> None:
    """Put a task in a processing state directly in SQL (as the archive pipeline would)."""
    touched = await app.services.db.execute(
        "UPDATE task SET status = %s, progress = %s, archive_key = %s, error = %s WHERE uuid = %s",
        [status, progress, archive_key, error, task_id],
    )
    assert touched == 1
    # A write behind the API's back sends no event: drop remembered pages and totals by hand.
    for store in app.services.stores.values():
        store.forget_totals()


async def batch_update(app: Any, items: list[Any]) -> Any:
    """POST to batch_update and return the raw response."""
    return await app.fetch("/tasks/batch_update", "POST", items)
