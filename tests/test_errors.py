"""Every error status of the contract with its problem+json body, and bodies that must not 5xx."""

import asyncio
import json
import logging
from urllib.parse import urlsplit

import pytest
import tornado.httpclient
from api_helpers import (
    MISSING_UUID,
    assert_problem,
    create_project,
    create_tasks,
    task_item,
)

BODY_ENDPOINTS = ["/projects", "/tasks/batch_create", "/tasks/batch_update"]


# 404: only a URL that does not exist


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PUT", "OPTIONS"])
@pytest.mark.parametrize("path", ["/nope", "/projects/", "/projects/a/b", "/tasks/x/y/z", "/"])
async def test_unknown_paths_are_404_whatever_the_method(app, method, path):
    body = {} if method in ("POST", "PUT") else None
    problem = assert_problem(await app.fetch(path, method, body), 404, "not_found")
    assert "errors" not in problem


@pytest.mark.parametrize(
    "path",
    [
        "/projects/not-a-uuid",
        "/projects/1234",
        f"/projects/{MISSING_UUID}x",
        f"/projects/{MISSING_UUID.replace('-', '')}",
        "/tasks/not-a-uuid",
        "/tasks/not-a-uuid/archive",
        "/projects/%ff",
        "/tasks/%E2%82%AC",
        f"/projects/{MISSING_UUID}",
        f"/tasks/{MISSING_UUID}",
        f"/tasks/{MISSING_UUID}/archive",
    ],
)
async def test_malformed_or_unknown_uuid_in_the_path_is_404(app, path):
    assert_problem(await app.fetch(path), 404, "not_found")


async def test_existing_project_is_not_found_under_tasks(app):
    project = await create_project(app)
    assert (await app.fetch(f"/projects/{project['uuid']}")).code == 200
    assert_problem(await app.fetch(f"/tasks/{project['uuid']}"), 404, "not_found")


async def test_unknown_reference_in_a_body_is_422_never_404(app):
    r = await app.fetch("/tasks/batch_create", "POST", [task_item(MISSING_UUID)])
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]["0"]) == {"project_id"}
    r = await app.fetch("/tasks/batch_update", "POST", [{"task_id": MISSING_UUID, "name": "x"}])
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]["0"]) == {"task_id"}


# 405: known path, wrong method


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/projects", {"GET", "POST"}),
        ("PUT", "/projects", {"GET", "POST"}),
        ("PATCH", "/projects", {"GET", "POST"}),
        ("POST", "/projects/{project}", {"GET"}),
        ("DELETE", "/projects/{project}", {"GET"}),
        ("PUT", "/projects/{project}", {"GET"}),
        ("POST", "/tasks", {"GET"}),
        ("DELETE", "/tasks/{task}", {"GET"}),
        ("POST", "/tasks/{task}/archive", {"GET"}),
        ("GET", "/tasks/batch_create", {"POST"}),
        ("PUT", "/tasks/batch_update", {"POST"}),
        ("POST", "/health", {"GET"}),
        ("POST", "/ready", {"GET"}),
        ("DELETE", "/metrics", {"GET"}),
        ("POST", "/openapi.json", {"GET"}),
    ],
)
async def test_wrong_method_on_a_known_path_is_405_with_allow(app, method, path, allowed):
    project = await create_project(app)
    (task,) = await create_tasks(app, task_item(project["uuid"]))
    path = path.format(project=project["uuid"], task=task["uuid"])
    body = {"name": "x", "price": 1} if method in ("POST", "PUT", "PATCH") else None
    r = await app.fetch(path, method, body)
    assert_problem(r, 405, "method_not_allowed")
    allow = {m.strip() for m in r.headers["Allow"].split(",")}
    assert allow - {"OPTIONS", "HEAD"} == allowed
    # Nothing was written by the refused request.
    assert (await app.fetch("/projects")).json()["total"] == 1


async def test_a_method_tornado_does_not_know_is_405_too(app):
    r = await app.fetch("/projects", "PROPFIND")
    assert_problem(r, 405, "method_not_allowed")
    assert "GET" in r.headers["Allow"]


# 400: not JSON, or not the JSON type expected at the top


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"name": "x", "price": 1',
        b"{'name': 'x'}",
        b'{"name": "x", "price": NaN}',
        b'{"name": "x", "price": Infinity}',
        b'{"name": "x", "price": -Infinity}',
        b"NaN",
        b'{"name": "x", "price": 1} trailing',
        b'{"name": "\xff\xfe", "price": 1}',
        b"\xef\xbb\xbf{}",
        b"[" * 100000 + b"]" * 100000,
        b'{"name": ' + b"[" * 100000 + b"]" * 100000 + b', "price": 1}',
        b'{"a": ' * 50000 + b"1" + b"}" * 50000,
    ],
)
@pytest.mark.parametrize("path", BODY_ENDPOINTS)
async def test_bodies_that_are_not_json_are_400(app, path, raw):
    r = await app.fetch(path, "POST", raw=raw, headers={"Content-Type": "application/json"})
    problem = assert_problem(r, 400, "invalid_json")
    assert problem["detail"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/projects", []),
        ("/projects", [{"name": "x", "price": 1}]),
        ("/projects", "project"),
        ("/projects", 5),
        ("/projects", None),
        ("/projects", True),
        ("/tasks/batch_create", {"name": "x"}),
        ("/tasks/batch_create", "tasks"),
        ("/tasks/batch_create", 1),
        ("/tasks/batch_update", {"task_id": MISSING_UUID}),
        ("/tasks/batch_update", None),
    ],
)
async def test_wrong_top_level_type_is_400(app, path, body):
    raw = json.dumps(body).encode()
    r = await app.fetch(path, "POST", raw=raw, headers={"Content-Type": "application/json"})
    assert_problem(r, 400, "invalid_json")


async def test_a_5000_digit_number_at_the_top_is_400(app):
    raw = b"9" * 5000
    r = await app.fetch("/projects", "POST", raw=raw, headers={"Content-Type": "application/json"})
    assert_problem(r, 400, "invalid_json")


# Malformed values inside a well-formed body: 422, never a 5xx


@pytest.mark.parametrize(
    "price",
    [b"1e400", b"-1e400", b"1e-400", b"9" * 5000, b"0." + b"0" * 4999 + b"1", b"1E+999999999"],
)
async def test_huge_or_tiny_numbers_as_price_are_422(app, price):
    raw = b'{"name": "x", "price": ' + price + b"}"
    r = await app.fetch("/projects", "POST", raw=raw, headers={"Content-Type": "application/json"})
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"price"}
    project = await create_project(app)
    raw = json.dumps([task_item(project["uuid"], price=0)]).replace("0}", price.decode() + "}")
    r = await app.fetch(
        "/tasks/batch_create",
        "POST",
        raw=raw.encode(),
        headers={"Content-Type": "application/json"},
    )
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]["0"]) == {"price"}


@pytest.mark.parametrize(
    "value",
    [
        b"9" * 5000,
        b"1e400",
        b"[" * 500 + b"]" * 500,
        b'{"a": {"b": {"c": [1, 2, {"d": null}]}}}',
        b'"\\u0000"',
        b"true",
    ],
)
@pytest.mark.parametrize("field", ["name", "description", "urls", "project_id", "estimate_date"])
async def test_odd_json_values_in_task_fields_are_422(app, field, value):
    project = await create_project(app)
    item = json.dumps({**task_item(project["uuid"]), field: "@@"}).encode()
    raw = b"[" + item.replace(b'"@@"', value) + b"]"
    r = await app.fetch(
        "/tasks/batch_create", "POST", raw=raw, headers={"Content-Type": "application/json"}
    )
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]["0"]) == {field}


@pytest.mark.parametrize("field", ["name", "description"])
async def test_a_nul_character_in_text_is_422(app, field):
    r = await app.fetch("/projects", "POST", {"name": "x", "price": 1, field: "a\u0000b"})
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {field}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "\\ud800", "price": 1}',
        b'{"name": "x\\udc00y", "price": 1}',
        b'{"name": "x", "price": 1, "description": "\\ud83d"}',
        b'{"\\ud800": 1}',
    ],
)
async def test_an_unpaired_surrogate_is_not_valid_json(app, raw):
    headers = {"Content-Type": "application/json"}
    r = await app.fetch("/projects", "POST", raw=raw, headers=headers)
    assert_problem(r, 400, "invalid_json")


async def test_a_surrogate_pair_is_one_character(app):
    raw = b'{"name": "smile \\ud83d\\ude00", "price": 1}'
    r = await app.fetch("/projects", "POST", raw=raw, headers={"Content-Type": "application/json"})
    assert r.code == 201, r.body
    assert r.json()["name"] == "smile \U0001f600"


@pytest.mark.parametrize("item", [1, "x", None, [], [1, 2]])
async def test_batch_items_that_are_not_objects_are_422_by_index(app, item):
    project = await create_project(app)
    r = await app.fetch("/tasks/batch_create", "POST", [task_item(project["uuid"]), item])
    problem = assert_problem(r, 422, "validation_error")
    assert set(problem["errors"]) == {"1"}


# 415: a body that is not application/json


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "application/json-patch+json",
        "text/json",
        None,
    ],
)
@pytest.mark.parametrize("path", BODY_ENDPOINTS)
async def test_a_body_that_is_not_application_json_is_415(app, path, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = await app.fetch(path, "POST", raw=b'{"name": "x", "price": 1}', headers=headers)
    assert_problem(r, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/json;charset=UTF-8", "Application/JSON"],
)
async def test_json_with_a_charset_parameter_is_accepted(app, content_type):
    r = await app.fetch(
        "/projects",
        "POST",
        raw=b'{"name": "x", "price": 1}',
        headers={"Content-Type": content_type},
    )
    assert r.code == 201, r.body


# 413: body over MAX_BODY_BYTES


def _project_body(size):
    body = json.dumps({"name": "x", "price": 1, "description": ""}).encode()
    return body.replace(b'""', b'"' + b"d" * (size - len(body)) + b'"')


async def _chunked(url, path, body, chunk=7):
    async def produce(write):
        for start in range(0, len(body), chunk):
            await write(body[start : start + chunk])

    client = tornado.httpclient.AsyncHTTPClient()
    return await client.fetch(
        url + path,
        method="POST",
        body_producer=produce,
        raise_error=False,
        headers={"Content-Type": "application/json"},
        request_timeout=30,
    )


async def test_body_over_the_limit_is_413_with_content_length_and_chunked(app, make_server):
    small = await make_server(max_body_bytes=100)
    at_limit, over = _project_body(100), _project_body(101)
    assert (len(at_limit), len(over)) == (100, 101)
    json_type = {"Content-Type": "application/json"}
    assert (await small.fetch("/projects", "POST", raw=at_limit, headers=json_type)).code == 201
    problem = assert_problem(
        await small.fetch("/projects", "POST", raw=over, headers=json_type),
        413,
        "payload_too_large",
    )
    assert "100" in problem["detail"]
    chunked = await _chunked(small.url, "/projects", over)
    assert chunked.code == 413, chunked.body
    assert chunked.headers["Content-Type"] == "application/problem+json"
    assert json.loads(chunked.body)["code"] == "payload_too_large"
    assert (await _chunked(small.url, "/projects", at_limit)).code == 201
    batch = json.dumps([{"name": "x" * 200}]).encode()
    r = await small.fetch("/tasks/batch_create", "POST", raw=batch, headers=json_type)
    assert_problem(r, 413, "payload_too_large")
    assert (await small.fetch("/projects")).json()["total"] == 2


async def test_default_limit_is_one_mebibyte(app):
    json_type = {"Content-Type": "application/json"}
    over = _project_body(1048577)
    assert_problem(
        await app.fetch("/projects", "POST", raw=over, headers=json_type), 413, "payload_too_large"
    )
    # Within the limit but with a description too long: a plain validation error.
    r = await app.fetch("/projects", "POST", raw=_project_body(1048576), headers=json_type)
    assert_problem(r, 422, "validation_error")


async def test_a_declared_huge_body_is_refused_without_being_sent(app):
    host = urlsplit(app.url)
    reader, writer = await asyncio.open_connection(host.hostname, host.port)
    writer.write(
        b"POST /projects HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000\r\n\r\n{"
    )
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = head.split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 413"), head
        assert b"application/problem+json" in head
        assert b"x-request-id: " in head.lower()
    finally:
        writer.close()


# 409 and 500


async def test_archive_of_an_unfinished_task_is_409(app):
    project = await create_project(app)
    (task,) = await create_tasks(app, task_item(project["uuid"]))
    problem = assert_problem(await app.fetch(f"/tasks/{task['uuid']}/archive"), 409, "conflict")
    assert "initialized" in problem["detail"]


async def test_an_unexpected_failure_is_a_bare_500_and_its_traceback_is_logged(
    app, monkeypatch, caplog
):
    async def broken(**_):
        raise RuntimeError("secret connection string postgresql://user:hunter2@db")

    monkeypatch.setattr(app.services.stores["projects"], "page", broken)
    with caplog.at_level(logging.ERROR):
        r = await app.fetch("/projects", headers={"X-Request-ID": "trace-me-500"})
    problem = assert_problem(r, 500, "internal_error")
    assert b"hunter2" not in r.body
    assert b"RuntimeError" not in r.body
    assert b"Traceback" not in r.body
    assert problem["request_id"] == "trace-me-500"
    logged = [rec for rec in caplog.records if rec.exc_info and "hunter2" in str(rec.exc_info[1])]
    assert logged, "the traceback was not logged"
    assert getattr(logged[0], "request_id", None) == "trace-me-500"
