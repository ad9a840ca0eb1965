"""schemathesis hooks for tests/fuzz/run.py.

- Archive sources stay on the loopback file server: every generated URL that Satchel would
  accept (and so later download) is rewritten to a file on the run's own file server, named by
  `FUZZ_FILE_SERVER`. URLs it rejects are left alone, so validation keeps being fuzzed; they are
  never fetched. Distinct URLs stay distinct and repeats stay repeats.
- Generated identifiers mostly name things that exist: random UUIDs would only ever reach the
  404 and "not found" branches, so a well-formed one is swapped, three times in four, for the
  id of a project or task the server has returned. Malformed ones are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from typing import Any

import schemathesis

from handlers.schemas import file_url_problem

FILE_SERVER = os.environ.get("FUZZ_FILE_SERVER", "http://127.0.0.1:9")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# Fixed, so that a run with schemathesis' --seed makes the same swaps again.
_CHOICE = random.Random(0)
SWAP_SHARE = 0.75
KNOWN: dict[str, list[str]] = {"project": [], "task": []}


def confine_urls(urls: list[Any]) -> list[Any]:
    """`urls` with every acceptable URL replaced by one on the file server."""
    names: dict[str, str] = {}
    confined: list[Any] = []
    for index, url in enumerate(urls):
        if isinstance(url, str) and file_url_problem(url) is None:
            url = names.setdefault(url, f"{FILE_SERVER}/{index}.bin")
        confined.append(url)
    return confined


def _known(kind: str, value: Any) -> Any:
    """`value`, or (mostly) a known id of `kind` when `value` is a well-formed UUID."""
    known = KNOWN[kind]
    if isinstance(value, str) and _UUID.match(value) and known and _CHOICE.random() < SWAP_SHARE:
        return _CHOICE.choice(known)
    return value


def prepare_body(body: Any) -> Any:
    """A request body with URLs confined and references mostly pointing at real things."""
    items = body if isinstance(body, list) else [body]
    for item in items:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("urls"), list):
            item["urls"] = confine_urls(item["urls"])
        if "project_id" in item:
            item["project_id"] = _known("project", item["project_id"])
        if "task_id" in item:
            item["task_id"] = _known("task", item["task_id"])
    return body


def remember(payload: Any) -> None:
    """Note the ids of the projects and tasks in a response."""
    items = payload.get("items", [payload]) if isinstance(payload, dict) else []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("uuid"), str):
            continue
        kind = "task" if "project" in item else "project"
        if item["uuid"] not in KNOWN[kind]:
            KNOWN[kind].append(item["uuid"])


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """The last word before a request leaves, in every phase (stateful links included)."""
    if isinstance(case.body, list | dict):
        case.body = prepare_body(case.body)
    path = case.operation.path
    if case.path_parameters and "uuid" in case.path_parameters:
        kind = "project" if path.startswith("/projects") else "task"
        case.path_parameters["uuid"] = _known(kind, case.path_parameters["uuid"])
    if case.query and "project_id" in case.query:
        case.query["project_id"] = _known("project", case.query["project_id"])


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    """Learn the ids the server hands out."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code in (200, 201) and content_type.startswith("application/json"):
        with contextlib.suppress(ValueError):
            remember(json.loads(response.content))
