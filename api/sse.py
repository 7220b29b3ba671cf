"""Server-sent events with FastAPI's own SSE response and encoder."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel

from api.errors import status_for
from inference.errors import EngineError

logger = logging.getLogger("api")


def encode(item: BaseModel | dict[str, Any] | str) -> bytes:
    if isinstance(item, BaseModel):
        return format_sse_event(data_str=item.model_dump_json())
    if isinstance(item, str):
        return format_sse_event(data_str=item)
    return format_sse_event(data_str=json.dumps(item, ensure_ascii=False))


def error_event(error: EngineError) -> bytes:
    """An error after the stream began can't change the status code: it goes out as the last event instead."""
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": status_for(error)}}
    return encode(body)


def sse_response(
    items: AsyncIterator[BaseModel | dict[str, Any] | str], headers: dict[str, str]
) -> EventSourceResponse:
    """Stream `items` as events. A client that goes away closes `items`, which cancels its requests in the engine."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield encode(item)
        except EngineError as error:
            yield error_event(error)

    return EventSourceResponse(body(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
