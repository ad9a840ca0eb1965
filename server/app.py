"""The application factory: routes of every handler module, wired to the shared services."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import tornado.web

from handlers import ops, projects, tasks, ws
from handlers.base import BaseHandler, NotFoundHandler
from server.config import Settings
from server.metrics import Metrics
from storage.db import Database
from storage.feed import EventFeed
from storage.projects import ProjectStore
from storage.s3 import ObjectStore
from storage.tasks import TaskStore

access_log = logging.getLogger("satchel.access")
# Idle websockets are pinged this often and closed when a pong takes longer than the timeout.
WS_PING_INTERVAL = 20.0
WS_PING_TIMEOUT = 15.0

ROUTES: list[tuple[str, type[BaseHandler], dict[str, Any]]] = [
    *projects.routes,
    *tasks.routes,
    *ops.routes,
    *ws.routes,
]


@dataclass
class Services:
    """What handlers reach through the application settings."""

    settings: Settings
    db: Database
    objects: ObjectStore
    metrics: Metrics
    feed: EventFeed
    stores: dict[str, Any] = field(default_factory=dict)
    runner: Any = None
    worker: Any = None  # the archive worker process, when there is one
    hub: Any = None
    sockets: set[Any] = field(default_factory=set)


def build_services(settings: Settings, db: Database, objects: ObjectStore) -> Services:
    """Services with a store per resource; a new model adds one line here."""
    metrics = Metrics()
    feed = EventFeed(db, retention=settings.event_retention, metrics=metrics)
    services = Services(settings=settings, db=db, objects=objects, metrics=metrics, feed=feed)
    ttl = settings.page_cache_ttl
    services.stores["projects"] = ProjectStore(db, page_ttl=ttl)
    services.stores["tasks"] = TaskStore(db, objects.link, page_ttl=ttl)
    services.hub = ws.EventHub(objects.link)
    return services


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """One line per request, and its metrics."""
    request = handler.request
    seconds = request.request_time()
    status = handler.get_status()
    route = getattr(handler, "route", "") or "unmatched"
    services: Services = handler.application.settings["services"]
    services.metrics.observe_request(
        route=route, method=request.method or "", status=status, seconds=seconds
    )
    level = logging.ERROR if status >= 500 else logging.INFO
    access_log.log(
        level,
        "%s %s %d",
        request.method,
        request.uri,
        status,
        extra={
            "request_id": getattr(handler, "request_id", None),
            "method": request.method,
            "route": route,
            "path": request.path,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
        },
    )


def make_app(services: Services) -> tornado.web.Application:
    """The Tornado application serving every route of the contract."""
    return tornado.web.Application(
        ROUTES,  # type: ignore[arg-type]
        services=services,
        routes=ROUTES,
        default_handler_class=NotFoundHandler,
        log_function=_log_request,
        compress_response=False,
        websocket_ping_interval=WS_PING_INTERVAL,
        websocket_ping_timeout=WS_PING_TIMEOUT,
        xsrf_cookies=False,
    )
