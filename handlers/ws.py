"""`GET /ws`: every change of the tasks (and projects) a client follows, live and resumable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import tornado.iostream
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


@dataclass
class Outgoing:
    """A message for one or more clients, serialised once until a merge changes it."""

    message: dict[str, Any]
    data: bytes | None = None

    def encoded(self) -> bytes:
        """The message as JSON bytes."""
        if self.data is None:
            self.data = orjson.dumps(self.message)
        return self.data


class ClientQueue:
    """Events waiting for one client.

    A client that keeps up gets every event. Once more than COALESCE_AFTER are waiting, a newer
    event of a task (or project) replaces its queued older one, which goes, and the newer one
    takes the tail with both `changed` lists merged; past `limit` the client is too slow.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = MAX_QUEUE if limit is None else limit
        self.items: deque[Outgoing] = deque()
        self.ready = asyncio.Event()

    def push(self, item: Outgoing) -> bool:
        """Queue a message; False when the client has fallen too far behind."""
        if len(self.items) >= COALESCE_AFTER:
            item = self._replace_older(item)
        self.items.append(item)
        self.ready.set()
        return len(self.items) <= self.limit

    def _replace_older(self, item: Outgoing) -> Outgoing:
        message = item.message
        subject = _subject(message)
        for older in self.items:
            if _subject(older.message) == subject:
                self.items.remove(older)
                if older.message["type"] == "task.created":
                    # The client never saw the task: it gets its creation, at the newest state.
                    created = {k: v for k, v in message.items() if k != "changed"}
                    return Outgoing(created | {"type": "task.created"})
                merged = [*older.message.get("changed", []), *message.get("changed", [])]
                return Outgoing({**message, "changed": list(dict.fromkeys(merged))})
        return item

    def take_all(self) -> list[Outgoing]:
        """Everything queued, oldest first."""
        items = list(self.items)
        self.items.clear()
        self.ready.clear()
        return items


def _subject(message: dict[str, Any]) -> tuple[str, str]:
    kind = "task" if "task" in message else "project"
    return kind, message[kind]["uuid"]


def frame(data: bytes) -> bytes:
    """One unmasked, uncompressed RFC 6455 text frame (servers never mask)."""
    size = len(data)
    if size < 126:
        head = struct.pack("!BB", 0x81, size)
    elif size <= 0xFFFF:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + data


class EventHub:
    """The instance's sockets, indexed by what they follow; each event is rendered once."""

    def __init__(self, link: Callable[[str], str]) -> None:
        self.link = link
        self.everything: set[EventSocket] = set()
        self.by_project: dict[str, set[EventSocket]] = {}
        self.by_task: dict[str, set[EventSocket]] = {}

    def add(self, socket: EventSocket) -> None:
        """Start delivering to `socket`."""
        if not socket.projects and not socket.tasks:
            self.everything.add(socket)
        for key in socket.projects:
            self.by_project.setdefault(key, set()).add(socket)
        for key in socket.tasks:
            self.by_task.setdefault(key, set()).add(socket)

    def remove(self, socket: EventSocket) -> None:
        """Stop delivering to `socket`."""
        self.everything.discard(socket)
        for index, keys in ((self.by_project, socket.projects), (self.by_task, socket.tasks)):
            for key in keys:
                followers = index.get(key)
                if followers is not None:
                    followers.discard(socket)
                    if not followers:
                        del index[key]

    def deliver(self, event: StoredEvent) -> None:
        """Queue the event for every socket that follows its task or project."""
        targets = set(self.everything)
        targets.update(self.by_project.get(event.project_id, ()))
        if event.task_id is not None:
            targets.update(self.by_task.get(event.task_id, ()))
        if not targets:
            return
        item = Outgoing(render(event, self.link))
        for socket in targets:
            socket.send_later(item)


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
        self._hub: EventHub = services.hub
        upto = services.feed.last_id
        self._hub.add(self)
        if self.since is not None:
            replay = await services.feed.replay(self.since, upto)
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

    def send_later(self, item: Outgoing) -> None:
        """Queue a message; a client that has fallen too far behind is let go."""
        if not self.queue.push(item):
            self.services.metrics.ws_dropped.inc()
            self._hub.remove(self)
            self.close(CLOSE_TRY_AGAIN, "too slow: reconnect with since")

    async def _send_queued(self) -> None:
        # Everything queued goes out in one write: one system call for a burst, not one each.
        while True:
            await self.queue.ready.wait()
            items = self.queue.take_all()
            connection = self.ws_connection
            if not items or connection is None or connection.is_closing():
                continue
            data = b"".join(frame(item.encoded()) for item in items)
            try:
                await connection.stream.write(data)  # type: ignore[union-attr]
            except tornado.iostream.StreamClosedError:
                return
            self.services.metrics.ws_messages.inc(len(items))

    async def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            await self.write_message(orjson.dumps(message).decode())
            self.services.metrics.ws_messages.inc()

    def on_message(self, message: str | bytes) -> None:
        """Clients have nothing to say; anything they send is ignored."""

    def on_close(self) -> None:
        """Unsubscribe and stop sending."""
        if hasattr(self, "_hub"):
            self._hub.remove(self)
            self.services.metrics.ws_connections.dec()
            self.services.sockets.discard(self)
        if self.sender is not None:
            self.sender.cancel()

    def check_origin(self, origin: str) -> bool:
        """Same-origin pages, the CORS origins, and clients that send no Origin."""
        allowed = self.services.settings.cors_origins
        return not origin or origin in allowed or super().check_origin(origin)


routes = [(r"/ws", EventSocket, {"route": "/ws"})]
