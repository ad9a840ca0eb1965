"""`/openapi.json`: a valid OpenAPI 3.1 document naming every route, method and field."""

import re

import pytest
import tornado.web
from openapi_spec_validator import OpenAPIV31SpecValidator

from handlers import schemas
from server.app import ROUTES

HTTP_METHODS = ("get", "post", "put", "patch", "delete", "head")


@pytest.fixture
async def document(app):
    r = await app.fetch("/openapi.json")
    assert r.code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    return r.json()


def _resolve(document, schema):
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = document["components"]["schemas"][name]
    return schema


def _implemented(handler):
    """The methods a handler class implements, as Tornado dispatches them."""
    return {
        m for m in HTTP_METHODS if getattr(handler, m) is not getattr(tornado.web.RequestHandler, m)
    }


def _routes():
    return [(kwargs["route"], handler) for _, handler, kwargs in ROUTES]


async def test_the_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1")
    OpenAPIV31SpecValidator(document).validate()


async def test_every_route_and_method_is_documented(document):
    paths = document["paths"]
    missing = []
    for route, handler in _routes():
        documented = {m for m in paths.get(route, {}) if m in HTTP_METHODS}
        missing += [f"{m.upper()} {route}" for m in _implemented(handler) - documented]
    assert missing == []
    assert {route for route, _ in _routes()} <= set(paths)


async def test_documented_methods_match_what_the_server_allows(app, document):
    for route in document["paths"]:
        path = re.sub(r"\{[^}]+\}", "00000000-0000-4000-8000-000000000000", route)
        r = await app.fetch(path, "OPTIONS")
        assert r.code == 204, (route, r.code)
        allowed = {m.strip().lower() for m in r.headers["Allow"].split(",")} - {"options"}
        documented = {m for m in document["paths"][route] if m in HTTP_METHODS}
        assert documented == allowed, route


@pytest.mark.parametrize(
    ("route", "method", "where", "schema"),
    [
        ("/projects", "post", "request", schemas.ProjectCreate),
        ("/projects", "post", "201", schemas.ProjectOut),
        ("/projects/{uuid}", "get", "200", schemas.ProjectOut),
        ("/tasks/{uuid}", "get", "200", schemas.TaskOut),
        ("/tasks/batch_create", "post", "request", schemas.TaskCreate),
        ("/tasks/batch_create", "post", "201", schemas.TaskOut),
        ("/tasks/batch_update", "post", "request", schemas.TaskUpdate),
        ("/tasks/batch_update", "post", "200", schemas.TaskOut),
    ],
)
async def test_every_schema_field_is_documented_where_it_is_used(
    document, route, method, where, schema
):
    operation = document["paths"][route][method]
    if where == "request":
        body = operation["requestBody"]["content"]["application/json"]["schema"]
    else:
        body = operation["responses"][where]["content"]["application/json"]["schema"]
    body = _resolve(document, body)
    if body.get("type") == "array":
        body = _resolve(document, body["items"])
    elif "items" in body.get("properties", {}):
        body = _resolve(document, body["properties"]["items"]["items"])
    assert set(schema().fields) <= set(body["properties"]), schema.__name__


async def test_the_embedded_project_is_documented(document):
    task = _resolve(document, {"$ref": "#/components/schemas/Task"})
    project = _resolve(document, task["properties"]["project"])
    assert set(schemas.ProjectOut().fields) <= set(project["properties"])


@pytest.mark.parametrize(
    ("route", "params"),
    [("/projects", {"limit", "offset"}), ("/tasks", {"limit", "offset", "project_id", "status"})],
)
async def test_list_query_parameters_are_documented(document, route, params):
    documented = {p["name"] for p in document["paths"][route]["get"]["parameters"]}
    assert documented == params


async def test_error_responses_are_problem_json(document):
    for route, operations in document["paths"].items():
        for method, operation in operations.items():
            if method not in HTTP_METHODS:
                continue
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and "content" in response:
                    assert set(response["content"]) == {"application/problem+json"}, (route, method)


async def test_item_routes_document_their_uuid_parameter(document):
    for route, operations in document["paths"].items():
        if "{uuid}" not in route:
            continue
        for method in set(operations) & set(HTTP_METHODS):
            names = {p["name"] for p in operations[method].get("parameters", [])}
            names |= {p["name"] for p in operations.get("parameters", [])}
            assert "uuid" in names, (route, method)
