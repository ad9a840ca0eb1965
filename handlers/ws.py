"""`GET /ws`: every change of the tasks (and projects) a client follows, live and resumable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import tornado.websocket

from handlers.base import BaseHandler
from storage.errors import InvalidJson, ValidationFailed
from storage.feed import StoredEvent

if TYPE_CHECKING:
    from server.app import Services

log = logging.getLogger("satchel.ws")
# Events a client may have queued before it counts as too slow: room for the burst of one
# full batch (1000 tasks and their projects' events) on top of normal traffic.
MAX_QUEUE = 2500
# Past this many waiting events a client is lagging, and older events of a task give way.
COALESCE_AFTER = 64
# RFC 6455 "try again later": the client should reconnect with `since`.
CLOSE_TRY_AGAIN = 1013
_SINCE = re.compile(r"^[0-9]{1,18}$")


def render(event: StoredEvent, link: Callable[[str], str]) -> dict[str, Any]:
    """The message of an event (without merging), with a freshly signed archive link."""
    message: dict[str, Any] = {"id": event.id, "type": event.type}
    if event.type not in ("task.created", "project.created"):
        message["changed"] = list(event.changed)
    if event.task_id is None:
        message["project"] = event.payload
        return message
    task = dict(event.payload)
    key = task.pop("archive_key", None)
    task["archive_url"] = link(key) if key else None
    message["task"] = task
    if event.type == "task.archived":
        message["archive_url"] = task["archive_url"]
    return message


class ClientQueue:
    """Events waiting for one client.

    A client that keeps up gets every event. Once more than COALESCE_AFTER are waiting, a newer
    event of a task (or project) replaces its queued older one, which goes, and the newer one
    takes the tail with both `changed` lists merged; past `limit` the client is too slow.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = MAX_QUEUE if limit is None else limit
        self.items: deque[dict[str, Any]] = deque()
        self.ready = asyncio.Event()

    def push(self, message: dict[str, Any]) -> bool:
        """Queue a message; False when the client has fallen too far behind."""
        if len(self.items) >= COALESCE_AFTER:
            message = self._replace_older(message)
        self.items.append(message)
        self.ready.set()
        return len(self.items) <= self.limit

    def _replace_older(self, message: dict[str, Any]) -> dict[str, Any]:
        subject = _subject(message)
        for older in self.items:
            if _subject(older) == subject:
                self.items.remove(older)
                if older["type"] == "task.created":
                    # The client never saw the task: it gets its creation, at the newest state.
                    created = {k: v for k, v in message.items() if k != "changed"}
                    return created | {"type": "task.created"}
                merged = [*older.get("changed", []), *message.get("changed", [])]
                return {**message, "changed": list(dict.fromkeys(merged))}
        return message

    def pop(self) -> dict[str, Any] | None:
        """The oldest queued message."""
        if not self.items:
            self.ready.clear()
            return None
        return self.items.popleft()


def _subject(message: dict[str, Any]) -> tuple[str, str]:
    kind = "task" if "task" in message else "project"
    return kind, message[kind]["uuid"]


class EventSocket(tornado.websocket.WebSocketHandler, BaseHandler):
    """One websocket client and its filters."""

    openapi = {
        "get": {
            "summary": "Live task and project events (websocket upgrade)",
            "parameters": [
                {
                    "in": "query",
                    "name": "project_id",
                    "schema": {"type": "string", "format": "uuid"},
                    "description": "Repeatable filter",
                },
                {
                    "in": "query",
                    "name": "task_id",
                    "schema": {"type": "string", "format": "uuid"},
                    "description": "Repeatable filter",
                },
                {
                    "in": "query",
                    "name": "since",
                    "schema": {"type": "integer", "minimum": 0},
                    "description": "Replay the events after this id, then go live",
                },
            ],
            "responses": {
                "101": {"description": "Switching to the websocket protocol"},
                "400": {"description": "Not a websocket upgrade"},
                "422": {"description": "A filter is not a UUID, or since is not an id"},
            },
        }
    }

    def initialize(self, route: str = "") -> None:  # type: ignore[override]
        """Set up the client's state."""
        BaseHandler.initialize(self, route)
        self.queue = ClientQueue()
        self.projects: set[str] = set()
        self.tasks: set[str] = set()
        self.sender: asyncio.Task[None] | None = None

    def prepare(self) -> None:
        """No body limits or CORS work for an upgrade."""

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Validate the filters, then upgrade (a plain request gets a 400 problem)."""
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise InvalidJson("This endpoint speaks websocket only: send an Upgrade request.")
        self.projects = self._uuids("project_id")
        self.tasks = self._uuids("task_id")
        since = self.get_query_argument("since", None)
        if since is not None and not _SINCE.match(since):
            raise ValidationFailed(
                "Invalid query parameters.",
                errors={"since": ["Must be an event id (a whole number)."]},
            )
        self.since = int(since) if since is not None else None
        self.services.db.require()
        await super().get(*args, **kwargs)

    def _uuids(self, name: str) -> set[str]:
        found = set()
        for index, value in enumerate(self.get_query_arguments(name)):
            try:
                found.add(str(uuid.UUID(value)))
            except ValueError:
                raise ValidationFailed(
                    "Invalid query parameters.", errors={name: {str(index): ["Not a valid UUID."]}}
                ) from None
        return found

    async def open(self, *args: str, **kwargs: str) -> None:
        """Subscribe, replay what the client missed, then stream live events."""
        services: Services = self.services
        services.metrics.ws_connections.inc()
        services.sockets.add(self)
        self._feed = services.feed
        upto = self._feed.last_id
        self._feed.subscribers.add(self._on_event)
        if self.since is not None:
            replay = await self._feed.replay(self.since, upto)
            if replay is None:
                await self._send({"type": "resync"})
                self.close(1000, "resync")
                return
            # Missed events go out one by one, before anything that arrived meanwhile.
            for event in replay:
                if self._wants(event):
                    await self._send(render(event, services.objects.link))
        self.sender = asyncio.ensure_future(self._send_queued())

    def _wants(self, event: StoredEvent) -> bool:
        if not self.projects and not self.tasks:
            return True
        return event.project_id in self.projects or event.task_id in self.tasks

    def _on_event(self, event: StoredEvent) -> None:
        if self._wants(event):
            self._send_later(event)

    def _send_later(self, event: StoredEvent) -> None:
        if not self.queue.push(render(event, self.services.objects.link)):
            self.services.metrics.ws_dropped.inc()
            self._feed.subscribers.discard(self._on_event)
            self.close(CLOSE_TRY_AGAIN, "too slow: reconnect with since")

    async def _send_queued(self) -> None:
        while True:
            await self.queue.ready.wait()
            message = self.queue.pop()
            if message is not None:
                await self._send(message)

    async def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            await self.write_message(orjson.dumps(message).decode())
            self.services.metrics.ws_messages.inc()

    def on_message(self, message: str | bytes) -> None:
        """Clients have nothing to say; anything they send is ignored."""

    def on_close(self) -> None:
        """Unsubscribe and stop sending."""
        if hasattr(self, "_feed"):
            self._feed.subscribers.discard(self._on_event)
            self.services.metrics.ws_connections.dec()
            self.services.sockets.discard(self)
        if self.sender is not None:
            self.sender.cancel()

    def check_origin(self, origin: str) -> bool:
        """Same-origin pages, the CORS origins, and clients that send no Origin."""
        allowed = self.services.settings.cors_origins
        return not origin or origin in allowed or super().check_origin(origin)


routes = [(r"/ws", EventSocket, {"route": "/ws"})]
