"""Optional API key: with API_KEY set, the REST and OpenAI routes need `Authorization: Bearer <key>`."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
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


def playground_auth(settings: Settings) -> Callable[[str, str], bool] | None:
    """The playground's login check: any user name, the API key as password (None: no login page)."""
    if settings.api_key is None:
        return None

    def check(username: str, password: str) -> bool:
        return key_matches(settings, password)

    return check
