"""`/tasks`: list with filters, get one, its archive, and the two batch endpoints."""

from __future__ import annotations

from handlers.generic import BatchHandler, CollectionHandler, ItemHandler
from handlers.schemas import TaskCreate, TaskQuery, TaskUpdate
from storage.errors import Conflict, NotFound


class TasksHandler(CollectionHandler):
    """`GET /tasks`, filtered by `project_id` and `status`."""

    store_name = "tasks"
    query_schema = TaskQuery()


class TaskHandler(ItemHandler):
    """`GET /tasks/{uuid}`."""

    store_name = "tasks"


class TaskArchiveHandler(ItemHandler):
    """`GET /tasks/{uuid}/archive`: a redirect to a fresh link once the archive exists."""

    store_name = "tasks"
    openapi = {
        "get": {
            "summary": "Download the task's archive",
            "responses": {
                "302": {
                    "description": "Redirect to a fresh archive link",
                    "headers": {"Location": {"schema": {"type": "string"}}},
                },
                "404": {"description": "No such task"},
                "409": {"description": "The task is not finished"},
            },
        }
    }

    async def get(self, uuid: str) -> None:
        """302 to the archive, or 409 while the task is not finished."""
        key = self.parse_uuid(uuid)
        task = await self.store.get(key)
        if task is None:
            raise NotFound(f"No task with uuid {key}.")
        if task["archive_url"] is None:
            raise Conflict(f"The archive is not ready: the task is {task['status']}.")
        self.redirect(task["archive_url"], status=302)


class TaskBatchCreateHandler(BatchHandler):
    """`POST /tasks/batch_create`."""

    store_name = "tasks"
    item_schema = TaskCreate()
    method_name = "create_batch"
    success_status = 201


class TaskBatchUpdateHandler(BatchHandler):
    """`POST /tasks/batch_update`."""

    store_name = "tasks"
    item_schema = TaskUpdate()
    method_name = "update_batch"


routes = [
    (r"/tasks", TasksHandler, {"route": "/tasks"}),
    (r"/tasks/batch_create", TaskBatchCreateHandler, {"route": "/tasks/batch_create"}),
    (r"/tasks/batch_update", TaskBatchUpdateHandler, {"route": "/tasks/batch_update"}),
    (r"/tasks/([^/]+)", TaskHandler, {"route": "/tasks/{uuid}"}),
    (r"/tasks/([^/]+)/archive", TaskArchiveHandler, {"route": "/tasks/{uuid}/archive"}),
]
