"""The OpenAPI 3.1 document, built from the routes and the marshmallow schemas they use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from handlers import schemas
from handlers.base import BaseHandler
from handlers.generic import BatchHandler, CollectionHandler, CreateHandler, ItemHandler

_SCHEMAS = {
    "Project": schemas.ProjectOut,
    "Task": schemas.TaskOut,
    "ProjectCreate": schemas.ProjectCreate,
    "TaskCreate": schemas.TaskCreate,
    "TaskUpdate": schemas.TaskUpdate,
    "Problem": schemas.ProblemOut,
}
_PROBLEMS = {
    "400": "Body is not valid JSON, or not the expected JSON type.",
    "404": "No such resource.",
    "405": "Method not allowed here (see `Allow`).",
    "409": "The resource is in a state that does not allow this.",
    "413": "Body over the size limit, or a batch over 1000 items.",
    "415": "Body is not application/json.",
    "422": "Validation failed; `errors` says where.",
    "503": "The database is unreachable.",
}
_OUT = {"/projects": "Project", "/tasks": "Task"}


def _operation_ref(route: str, method: str) -> str:
    return "#/paths/" + route.replace("~", "~0").replace("/", "~1") + "/" + method


def _link(route: str, method: str, **fields: Any) -> dict[str, Any]:
    return {"operationRef": _operation_ref(route, method), **fields}


_FIRST_TASK = "$response.body#/items/0/uuid"
# How a response feeds the next request (OpenAPI links): for clients, and the paths the
# stateful phase of tests/fuzz/run.py follows. Keyed by (route, method, status).
_LINKS: dict[tuple[str, str, str], dict[str, Any]] = {
    ("/projects", "post", "201"): {
        "GetProject": _link("/projects/{uuid}", "get", parameters={"uuid": "$response.body#/uuid"}),
        "ListItsTasks": _link("/tasks", "get", parameters={"project_id": "$response.body#/uuid"}),
        "CreateItsTasks": _link(
            "/tasks/batch_create", "post", requestBody=[{"project_id": "{$response.body#/uuid}"}]
        ),
    },
    ("/tasks/batch_create", "post", "201"): {
        "GetTask": _link("/tasks/{uuid}", "get", parameters={"uuid": _FIRST_TASK}),
        "GetArchive": _link("/tasks/{uuid}/archive", "get", parameters={"uuid": _FIRST_TASK}),
        "UpdateTask": _link(
            "/tasks/batch_update", "post", requestBody=[{"task_id": "{" + _FIRST_TASK + "}"}]
        ),
    },
    ("/tasks/batch_update", "post", "200"): {
        "GetTask": _link("/tasks/{uuid}", "get", parameters={"uuid": _FIRST_TASK}),
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problems(*codes: str) -> dict[str, Any]:
    problem = {"content": {"application/problem+json": {"schema": _ref("Problem")}}}
    return {code: {"description": _PROBLEMS[code], **problem} for code in codes}


def _schema_name(schema: Any) -> str:
    return next(name for name, cls in _SCHEMAS.items() if isinstance(schema, cls))


def _operations(
    handler: type[BaseHandler], route: str, spec: APISpec, plugin: MarshmallowPlugin
) -> dict[str, Any]:
    """The operations of one route, from what its handler class is."""
    resource = "/" + route.strip("/").split("/")[0]
    out = _OUT.get(resource, "Task")
    uuid_param = [
        {
            "in": "path",
            "name": "uuid",
            "required": True,
            "schema": {"type": "string", "format": "uuid"},
        }
    ]
    ops: dict[str, Any] = dict(getattr(handler, "openapi", {}))
    if issubclass(handler, CollectionHandler):
        assert plugin.converter is not None
        params = plugin.converter.schema2parameters(type(handler.query_schema), location="query")
        page = {
            "type": "object",
            "required": ["items", "total", "limit", "offset"],
            "properties": {
                "items": {"type": "array", "items": _ref(out)},
                "total": {"type": "integer"},
                "limit": {"type": "integer"},
                "offset": {"type": "integer"},
            },
        }
        ops["get"] = {
            "summary": f"A page of {resource[1:]}",
            "parameters": params,
            "responses": {"200": _json(page, "A page"), **_problems("422", "503")},
        }
    if issubclass(handler, CreateHandler):
        body = _ref(_schema_name(handler.create_schema))
        ops["post"] = {
            "summary": f"Create one of {resource[1:]}",
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "201": {
                    **_json(_ref(out), "Created"),
                    "headers": {"Location": {"schema": {"type": "string"}}},
                },
                **_problems("400", "413", "415", "422", "503"),
            },
        }
    if issubclass(handler, ItemHandler) and "get" not in ops:
        ops["get"] = {
            "summary": f"One item of {resource[1:]}",
            "parameters": uuid_param,
            "responses": {"200": _json(_ref(out), "The item"), **_problems("404", "503")},
        }
    elif issubclass(handler, ItemHandler):
        ops["get"]["parameters"] = uuid_param
    if issubclass(handler, BatchHandler):
        item = _ref(_schema_name(handler.item_schema))
        array = {"type": "array", "minItems": 1, "maxItems": 1000, "items": item}
        result = {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": _ref(out)}},
        }
        ops["post"] = {
            "summary": handler.__doc__.strip().splitlines()[0] if handler.__doc__ else route,
            "requestBody": {"required": True, "content": {"application/json": {"schema": array}}},
            "responses": {
                str(handler.success_status): _json(result, "Every item, in input order"),
                **_problems("400", "413", "415", "422", "503"),
            },
        }
    return ops


def build_document(
    routes: Sequence[tuple[str, type[BaseHandler], dict[str, Any]]],
) -> dict[str, Any]:
    """The OpenAPI document of `routes`."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Satchel",
        version="1.0.0",
        openapi_version="3.1.0",
        plugins=[plugin],
        info={"description": "Projects and tasks whose files are zipped straight into S3."},
    )
    for name, schema in _SCHEMAS.items():
        spec.components.schema(name, schema=schema)
    for _pattern, handler, kwargs in routes:
        route = kwargs["route"]
        ops = _operations(handler, route, spec, plugin)
        for method, op in ops.items():
            for status, response in op.get("responses", {}).items():
                if (route, method, status) in _LINKS:
                    response["links"] = _LINKS[route, method, status]
        if ops:
            spec.path(path=route, operations=ops)
    return spec.to_dict()
