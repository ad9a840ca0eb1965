"""Operational endpoints: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from handlers.base import BaseHandler
from handlers.openapi import build_document

# Readiness must answer quickly even while the database hangs.
READY_TIMEOUT = 3.0


def _op(summary: str, code: str, description: str, content_type: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                code: {"description": description, "content": {content_type: {"schema": {}}}}
            },
        }
    }


class HealthHandler(BaseHandler):
    """`GET /health`: 200 while the process runs, database or not."""

    openapi = _op("Liveness", "200", "The process runs", "application/json")

    def get(self) -> None:
        """Always alive."""
        self.send_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    """`GET /ready`: 200 when both PostgreSQL and S3 answer."""

    openapi = _op("Readiness", "200", "PostgreSQL and S3 answer", "application/json")
    openapi["get"]["responses"]["503"] = {"description": "PostgreSQL or S3 does not answer"}

    async def get(self) -> None:
        """Check both dependencies at once and say which is down."""
        db_ok, s3_ok = await asyncio.gather(self._database(), self.services.objects.ping())
        checks = {"database": "ok" if db_ok else "down", "s3": "ok" if s3_ok else "down"}
        status = 200 if db_ok and s3_ok else 503
        if status == 503:
            self.set_header("Retry-After", "1")
        self.send_json(
            {"status": "ok" if status == 200 else "unavailable", "checks": checks}, status
        )

    async def _database(self) -> bool:
        db = self.services.db
        if not db.available:
            return False
        try:
            await asyncio.wait_for(db.fetchone("SELECT 1"), READY_TIMEOUT)
        except Exception:
            return False
        return True


class MetricsHandler(BaseHandler):
    """`GET /metrics`: Prometheus text format."""

    openapi = _op("Prometheus metrics", "200", "Text exposition format", "text/plain")

    async def get(self) -> None:
        """The instance's metrics: this process's, and its archive worker's."""
        text = generate_latest(self.services.metrics.registry)
        if self.services.worker is not None:
            text += await self.services.worker.metrics_text()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(text)


class OpenApiHandler(BaseHandler):
    """`GET /openapi.json`: the OpenAPI 3.1 document of every route."""

    openapi = _op("This document", "200", "OpenAPI 3.1", "application/json")

    def get(self) -> None:
        """The document, built once per application."""
        document = self.application.settings.get("openapi_document")
        if document is None:
            document = build_document(self.application.settings["routes"])
            self.application.settings["openapi_document"] = document
        self.send_json(document)


routes = [
    (r"/health", HealthHandler, {"route": "/health"}),
    (r"/ready", ReadyHandler, {"route": "/ready"}),
    (r"/metrics", MetricsHandler, {"route": "/metrics"}),
    (r"/openapi.json", OpenApiHandler, {"route": "/openapi.json"}),
]
