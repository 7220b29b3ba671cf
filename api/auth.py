"""Optional API key: with API_KEY set, the REST and OpenAI routes need `Authorization: Bearer <key>`."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from api.throttle import FailureBackoff, client_of
from inference.settings import Settings

bearer = HTTPBearer(auto_error=False, description="The server's API_KEY, when it has one.")


def key_matches(settings: Settings, given: str) -> bool:
    expected = settings.api_key.get_secret_value() if settings.api_key else ""
    return secrets.compare_digest(given.encode(), expected.encode())


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    settings: Settings = request.app.state.settings
    if settings.api_key is None:
        return
    backoff: FailureBackoff = request.app.state.auth_backoff
    client = client_of(request.scope)
    if credentials is not None:
        await backoff.admit(client)  # a client that sent wrong keys waits its turn; nothing may await after this
        if key_matches(settings, credentials.credentials):
            backoff.succeeded(client)
            return
        backoff.failed(client)
    # the message never echoes what was sent: a wrong key must not end up in anyone's logs
    raise HTTPException(
        401, "Missing or invalid API key: send `Authorization: Bearer <API_KEY>`.", {"WWW-Authenticate": "Bearer"}
    )


class FastJsonRequest(Request):
    """A request whose JSON body is parsed by orjson, several times faster than the json module on a large body (a
    ~1 MB prompt is refused sooner, costing the server less); any body orjson refuses is parsed again by the json
    module, so what is accepted, and how a bad body is refused (NaN, a lone surrogate named by its parameter), is
    as before."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError:
                self._json = json.loads(body)
        return self._json


class AuthFirstRoute(APIRoute):
    """A route that checks the API key before it reads the body: FastAPI parses and validates the body before it
    runs any dependency, so without this a caller with no key got 422 for a bad body instead of 401. The
    `require_api_key` dependency stays on the routes too, for the OpenAPI spec's security scheme. Its body is parsed
    by `FastJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def authorized_first(request: Request) -> Response:
            await require_api_key(request, await bearer(request))
            return await handler(FastJsonRequest(request.scope, request.receive))

        return authorized_first


def playground_auth(settings: Settings) -> Callable[[str, str], bool] | None:
    """The playground's login check: any user name, the API key as password (None: no login page)."""
    if settings.api_key is None:
        return None

    def check(username: str, password: str) -> bool:
        return key_matches(settings, password)

    return check
