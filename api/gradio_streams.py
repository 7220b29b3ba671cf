"""Gradio's message streams for a session or event its queue does not hold: a 404 in the one error shape.

`GET /gradio_api/queue/data?session_hash=...` (the page's stream) and `GET /gradio_api/call/<name>/<event_id>`
(gradio_client's and curl's) stream a queued event's messages. Gradio finds out that it holds no such session only
inside the stream, after its 200 went out, and then breaks the connection: the client reads a truncated response, the
log gets a traceback. Added before the Gradio mount, this route answers those requests first, with the 404 Gradio
meant; a stream for a session the queue holds goes on to Gradio as before.
"""

from __future__ import annotations

from typing import Any, NoReturn
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

QUEUE_DATA = "/gradio_api/queue/data"
CALL = "/gradio_api/call/"


class UnknownStreams(BaseRoute):
    def __init__(self, blocks: Any) -> None:
        self.blocks = blocks

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and self._unknown(scope) is not None:
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: object) -> NoReturn:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise HTTPException(404, self._unknown(scope) or "Not found.")

    def _unknown(self, scope: Scope) -> str | None:
        """Why this is a stream Gradio's queue holds nothing for; None when it is not such a stream."""
        path: str = scope["path"]
        # Gradio's own bookkeeping (gradio/queueing.py); its routes look the session up the same way
        queue = self.blocks._queue
        if path == QUEUE_DATA:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            session = query.get("session_hash", [""])[0]
            if not session or session in queue.pending_messages_per_session:
                return None  # no session_hash at all: Gradio's own 422 says so
            return "There is no session with this `session_hash` waiting for messages; join the queue first."
        parts = path.removeprefix(CALL).split("/") if path.startswith(CALL) else []
        if len(parts) != 2 or not all(parts):
            return None
        event_id = parts[1]
        event = queue.event_ids_to_events.get(event_id)
        session = event.session_hash if event is not None else None
        if session is None:  # a finished event whose messages are still to be read, or one never queued
            held = (s for s, ids in queue.pending_event_ids_session.items() if event_id in ids)
            session = next(held, event_id)
        if session in queue.pending_messages_per_session:
            return None
        return "There is no event with this id to read: it was never queued, or its messages were already read."
