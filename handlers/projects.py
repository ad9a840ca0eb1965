"""`/projects`: list, create, and get one."""

from __future__ import annotations

from handlers.generic import CreateHandler, ItemHandler
from handlers.schemas import ProjectCreate


class ProjectsHandler(CreateHandler):
    """`GET /projects` and `POST /projects`."""

    store_name = "projects"
    create_schema = ProjectCreate()
    item_path = "/projects/{uuid}"


class ProjectHandler(ItemHandler):
    """`GET /projects/{uuid}`."""

    store_name = "projects"


routes = [
    (r"/projects", ProjectsHandler, {"route": "/projects"}),
    (r"/projects/([^/]+)", ProjectHandler, {"route": "/projects/{uuid}"}),
]
