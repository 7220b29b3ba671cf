"""Gradio's file-upload routes, refused before Gradio sees them.

Nothing in the playground takes a file, yet Gradio's upload route accepts anonymous files and keeps them (one client
can fill the disk at network speed), and a refused multipart upload can leave its temp file behind. Added before the
Gradio mount, so these paths never reach it; the login form (also multipart, but fields only) is left alone.
"""

from __future__ import annotations

from typing import NoReturn

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

UPLOAD_PATHS = ("/gradio_api/upload", "/gradio_api/upload_progress", "/gradio_api/process_recording")
# Takes JSON for components' server functions (none here), or multipart with files: the latter is an upload too.
COMPONENT_SERVER = "/gradio_api/component_server"


def is_upload(scope: Scope) -> bool:
    path = scope["path"].rstrip("/")
    if path in UPLOAD_PATHS:
        return True
    content_type = Headers(scope=scope).get("content-type", "")
    return path == COMPONENT_SERVER and content_type.lower().startswith("multipart/")


class NoUploads(BaseRoute):
    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and is_upload(scope):
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: object) -> NoReturn:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise HTTPException(403, "This server takes no file uploads: nothing in the playground uses them.")
