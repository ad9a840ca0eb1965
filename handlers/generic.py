"""Handlers written once for every resource: paginated list, get by UUID, create, batches.

A resource's module subclasses these and names its store and schemas; the behaviour (query
validation, 404s, 413 for oversized batches, per-index 422s, `Location`) lives here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from marshmallow import Schema, ValidationError

from handlers.base import BaseHandler, validate_items
from handlers.schemas import PageQuery
from storage.errors import InvalidJson, NotFound, PayloadTooLarge, ValidationFailed
from storage.store import Store

MAX_BATCH = 1000


class ResourceHandler(BaseHandler):
    """A handler bound to one store of `Services.stores`."""

    store_name: ClassVar[str]

    @property
    def store(self) -> Any:
        """The resource's store, after checking the database can be reached."""
        self.services.db.require()
        return self.services.stores[self.store_name]


class CollectionHandler(ResourceHandler):
    """`GET /things`: a page of items."""

    query_schema: ClassVar[Schema] = PageQuery()

    async def get(self) -> None:
        """A page of items in creation order, with the total."""
        query = self.load_query(self.query_schema)
        store: Store = self.store
        page = await store.page(**query)
        # The items arrive as JSON text from PostgreSQL: join them, do not parse them.
        tail = f'],"total":{page.total},"limit":{query["limit"]},"offset":{query["offset"]}}}'
        self.set_header("Content-Type", "application/json")
        self.finish(('{"items":[' + ",".join(page.items) + tail).encode())


class CreateHandler(CollectionHandler):
    """`GET /things` and `POST /things` (one item)."""

    create_schema: ClassVar[Schema]
    item_path: ClassVar[str]

    async def post(self) -> None:
        """Create one item: 201 with the item and its `Location`."""
        body = self.json_body()
        if not isinstance(body, dict):
            raise InvalidJson("The request body must be a JSON object.")
        try:
            fields = self.create_schema.load(body)
        except ValidationError as exc:
            raise ValidationFailed("The item is invalid.", errors=exc.messages) from None
        item = await self.store.create(**fields)
        self.set_header("Location", self.item_path.format(uuid=item["uuid"]))
        self.send_json(item, status=201)


class ItemHandler(ResourceHandler):
    """`GET /things/{uuid}`."""

    async def get(self, uuid: str) -> None:
        """One item, or 404 when the UUID is malformed or unknown."""
        key = self.parse_uuid(uuid)
        item = await self.store.get(key)
        if item is None:
            raise NotFound(f"No {self.store_name[:-1]} with uuid {key}.")
        self.send_json(item)


class BatchHandler(ResourceHandler):
    """`POST /things/batch_…`: 1..1000 items applied atomically, errors keyed by index."""

    item_schema: ClassVar[Schema]
    method_name: ClassVar[str]
    success_status: ClassVar[int] = 200

    async def post(self) -> None:
        """Validate every item, then apply all of them or none."""
        body = self.json_body()
        if not isinstance(body, list):
            raise InvalidJson("The request body must be a JSON array of items.")
        if len(body) > MAX_BATCH:
            raise PayloadTooLarge(f"A batch holds at most {MAX_BATCH} items, not {len(body)}.")
        if not body:
            raise ValidationFailed(
                "A batch holds at least one item.",
                errors={"_schema": ["Must hold between 1 and 1000 items."]},
            )
        items, errors = validate_items(self.item_schema, body)
        apply = getattr(self.store, self.method_name)
        self.send_json({"items": await apply(items, errors)}, status=self.success_status)
