"""Operations: /health, /ready, /metrics, X-Request-ID on every response, and CORS."""

import pytest
from api_helpers import MISSING_UUID, create_project
from prometheus_client.parser import text_string_to_metric_families

ALLOWED = "http://a.test"


def _samples(text, name):
    """{labels tuple: value} of the samples called `name`."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def _metrics(app):
    r = await app.fetch("/metrics")
    assert r.code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return r.body.decode()


def _key(route, method, status):
    return (("method", method), ("route", route), ("status", str(status)))


async def test_health_is_200(app):
    r = await app.fetch("/health")
    assert r.code == 200
    assert r.json() == {"status": "ok"}


async def test_ready_is_200_when_database_and_s3_answer(app):
    r = await app.fetch("/ready")
    assert r.code == 200, r.body
    assert r.json()["checks"] == {"database": "ok", "s3": "ok"}


async def test_ready_is_503_when_s3_does_not_answer(app, make_server):
    broken = await make_server(s3_endpoint_url="http://127.0.0.1:9")
    r = await broken.fetch("/ready")
    assert r.code == 503
    assert r.json()["checks"] == {"database": "ok", "s3": "down"}


async def test_requests_are_counted_by_route_template_method_and_status(app):
    project = await create_project(app)
    before = _samples(await _metrics(app), "satchel_http_requests_total")
    for _ in range(3):
        assert (await app.fetch(f"/projects/{project['uuid']}")).code == 200
    assert (await app.fetch(f"/projects/{MISSING_UUID}")).code == 404
    assert (await app.fetch("/projects", "POST", {"name": "x", "price": -1})).code == 422
    assert (await app.fetch(f"/no/such/{MISSING_UUID}")).code == 404
    text = await _metrics(app)
    after = _samples(text, "satchel_http_requests_total")

    def grew(key):
        return after.get(key, 0) - before.get(key, 0)

    assert grew(_key("/projects/{uuid}", "GET", 200)) == 3
    assert grew(_key("/projects/{uuid}", "GET", 404)) == 1
    assert grew(_key("/projects", "POST", 422)) == 1
    # Raw paths never become labels: that would grow the metric without bound.
    routes = {dict(labels)["route"] for labels in after}
    assert not any(MISSING_UUID in route or project["uuid"] in route for route in routes)
    assert sum(grew(k) for k in after if dict(k)["status"] == "404") == 2
    buckets = _samples(text, "satchel_http_request_duration_seconds_count")
    assert buckets[_key("/projects/{uuid}", "GET", 200)] >= 3


# X-Request-ID


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/health", None, 200),
        ("GET", "/projects", None, 200),
        ("POST", "/projects", {"name": "x", "price": 1}, 201),
        ("POST", "/projects", {"name": "x"}, 422),
        ("GET", "/projects?limit=0", None, 422),
        ("GET", "/nowhere", None, 404),
        ("GET", f"/projects/{MISSING_UUID}", None, 404),
        ("DELETE", "/projects", None, 405),
        ("POST", "/tasks/batch_create", [{}] * 1001, 413),
        ("GET", "/metrics", None, 200),
        ("GET", "/openapi.json", None, 200),
        ("OPTIONS", "/projects", None, 204),
    ],
)
async def test_request_id_is_echoed_or_generated_on_every_response(app, method, path, body, status):
    r = await app.fetch(path, method, body, headers={"X-Request-ID": "client-id-42"})
    assert r.code == status
    assert r.headers["X-Request-ID"] == "client-id-42"
    first = await app.fetch(path, method, body)
    second = await app.fetch(path, method, body)
    assert first.code == second.code == status
    assert first.headers["X-Request-ID"]
    assert second.headers["X-Request-ID"]
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


async def test_request_id_is_in_error_bodies_and_bad_request_ids_are_replaced(app):
    r = await app.fetch("/nowhere", headers={"X-Request-ID": "abc-123"})
    assert r.json()["request_id"] == "abc-123"
    for bad in ("has space", "x" * 500):
        r = await app.fetch("/nowhere", headers={"X-Request-ID": bad})
        assert r.headers["X-Request-ID"] not in ("", bad)
        assert r.json()["request_id"] == r.headers["X-Request-ID"]


async def test_request_id_on_400_415_and_500(app, monkeypatch):
    json_type = {"Content-Type": "application/json", "X-Request-ID": "rid-1"}
    r = await app.fetch("/projects", "POST", raw=b"{", headers=json_type)
    assert (r.code, r.headers["X-Request-ID"]) == (400, "rid-1")
    r = await app.fetch("/projects", "POST", raw=b"{}", headers={"X-Request-ID": "rid-2"})
    assert (r.code, r.headers["X-Request-ID"]) == (415, "rid-2")

    async def broken(*_, **__):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.services.stores["projects"], "get", broken)
    r = await app.fetch(f"/projects/{MISSING_UUID}", headers={"X-Request-ID": "rid-3"})
    assert (r.code, r.headers["X-Request-ID"]) == (500, "rid-3")


# CORS


@pytest.fixture
async def browser_app(app, make_server):
    return await make_server(cors_origins=(ALLOWED, "https://b.test"))


async def test_cors_for_allowed_origins_only_on_every_response(browser_app):
    requests = [
        ("GET", "/projects", None, 200),
        ("POST", "/projects", {"name": "x", "price": 1}, 201),
        ("POST", "/projects", {"name": ""}, 422),
        ("GET", "/nowhere", None, 404),
        ("DELETE", "/projects", None, 405),
        ("GET", "/health", None, 200),
    ]
    for method, path, body, status in requests:
        r = await browser_app.fetch(path, method, body, headers={"Origin": ALLOWED})
        assert r.code == status
        assert r.headers["Access-Control-Allow-Origin"] == ALLOWED, (method, path)
        assert "Origin" in r.headers.get("Vary", "")
        assert "X-Request-ID" in r.headers.get("Access-Control-Expose-Headers", "")
    r = await browser_app.fetch("/projects", headers={"Origin": "https://b.test"})
    assert r.headers["Access-Control-Allow-Origin"] == "https://b.test"
    for origin in ("http://evil.test", "http://a.test:8080", "https://a.test", "null"):
        r = await browser_app.fetch("/projects", headers={"Origin": origin})
        assert r.code == 200
        assert "Access-Control-Allow-Origin" not in r.headers, origin


async def test_preflight_is_204_and_grants_only_allowed_origins(browser_app):
    project = await create_project(browser_app)
    headers = {
        "Origin": ALLOWED,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-request-id",
    }
    r = await browser_app.fetch("/tasks/batch_create", "OPTIONS", headers=headers)
    assert r.code == 204
    assert r.body == b""
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "content-type" in r.headers["Access-Control-Allow-Headers"].lower()
    r = await browser_app.fetch(f"/projects/{project['uuid']}", "OPTIONS", headers=headers)
    assert r.code == 204
    assert "GET" in r.headers["Access-Control-Allow-Methods"]

    headers["Origin"] = "http://evil.test"
    r = await browser_app.fetch("/projects", "OPTIONS", headers=headers)
    assert r.code == 204
    assert "Access-Control-Allow-Origin" not in r.headers
    assert "Access-Control-Allow-Methods" not in r.headers


async def test_no_cors_headers_without_configured_origins(app):
    r = await app.fetch("/projects", headers={"Origin": ALLOWED})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = await app.fetch(
        "/projects", "OPTIONS", headers={"Origin": ALLOWED, "Access-Control-Request-Method": "GET"}
    )
    assert r.code == 204
    assert "Access-Control-Allow-Origin" not in r.headers
