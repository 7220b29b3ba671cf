"""API paths that no route answers: 404, or 405 with `Allow`, in the one error shape.

The playground is mounted at "/", so without this a wrong method or an unknown path under the API would fall through
to Gradio, which answers with its own `{"detail": "Not Found"}`. Added after every API route and before the mount, so
a real route always matches first.
"""

from __future__ import annotations

from typing import NoReturn

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

API_PREFIXES = ("/v1", "/generate", "/generate_stream", "/info", "/tokenize", "/health", "/model-info", "/metrics")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def is_api_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in API_PREFIXES)


class ApiFallback(BaseRoute):
    """Matches every API path; only reached when no route before it matched fully."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and is_api_path(scope["path"]):
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: object) -> NoReturn:
        raise NoMatchFound(name, path_params)

    def allowed_methods(self, scope: Scope) -> list[str]:
        """The methods that some route before this one takes for the path."""
        allowed = []
        for method in METHODS:
            trial = {**scope, "method": method}
            for route in scope["app"].router.routes:
                if route is self:
                    break
                if route.matches(trial)[0] is Match.FULL:
                    allowed.append(method)
                    break
        return allowed

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"][:200]
        allowed = self.allowed_methods(scope)
        if allowed:
            raise HTTPException(
                405,
                f"`{scope['method']}` is not allowed on `{path}`; it takes {', '.join(allowed)}.",
                headers={"Allow": ", ".join(allowed)},
            )
        raise HTTPException(404, f"There is no `{path}` on this server; /docs lists the API.")
