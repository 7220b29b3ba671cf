"""Connections: a cap on how many the server holds, a deadline and a size limit for each request's head.

uvicorn bounds none of these: a client that opens connections and sends nothing, or a header a byte at a time, holds
a file descriptor each for as long as it likes (~20,000 of them took /health off the air), and the httptools parser
buffers headers without limit. uvicorn's `limit_concurrency` is no answer: once reached it answers 503 to everyone,
probes included. Instead:

- past MAX_CONNECTIONS, the connection idle longest (no request in progress: not yet sent one, or kept alive after
  one) is closed to make room, so probes and real requests keep getting in while idle sockets are shed;
- a request head (request line and headers) must arrive within HEADER_TIMEOUT_S, else 408 and close;
- a head over MAX_HEAD_BYTES gets 431 and close.

Built on uvicorn's httptools protocol (httptools is pinned), through uvicorn's `http=` option, which takes a class;
it uses that class's hooks `connection_made`, `data_received`, the parser's `on_headers_complete` and
`on_message_complete`, `on_response_complete`, `connection_lost`, and its `cycle` and `pipeline`.
tests/test_connections.py fails if an upgrade of uvicorn changes them.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inference.settings import Settings

logger = logging.getLogger("api")
# Generous: browsers send 1-4 KB of headers (cookies included); h11's own default limit is 16 KB.
MAX_HEAD_BYTES = 64 * 1024


class ConnectionGuard:
    """What one server's connections share: the limits, and its idle connections, longest idle first."""

    def __init__(self, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.open = 0
        self.idle: OrderedDict[GuardedProtocol, float] = OrderedDict()
        self.shed = 0  # connections closed to make room

    def make_room(self) -> None:
        while self.open > self.max_connections and self.idle:
            oldest, _ = self.idle.popitem(last=False)
            oldest.close()
            self.shed += 1
            if self.shed == 1 or self.shed % 1000 == 0:  # an attack is worth a line in the log, not one per socket
                logger.warning(
                    "MAX_CONNECTIONS=%d reached: closed the longest-idle connection to make room (%d so far)",
                    self.max_connections,
                    self.shed,
                )


class GuardedProtocol(HttpToolsProtocol):
    guard: ConnectionGuard  # set on the subclass `guarded_protocol` makes, one per server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._reading_head = True  # the next bytes belong to a request head (none has begun, or one is incomplete)
        self._head_bytes = 0
        self._counted = False

    # ----- uvicorn's hooks ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._counted = True
        self.guard.open += 1
        self._become_idle()
        self._arm_head_deadline()
        self.guard.make_room()  # may close this very connection, if every other one is busy

    def data_received(self, data: bytes) -> None:
        was_reading_head = self._reading_head
        super().data_received(data)  # calls on_headers_complete and on_message_complete as they happen
        if self.transport.is_closing():
            return
        if not (self._reading_head and self._idle):  # a request is being read, or is the app's
            self._cancel_head_deadline()
            return
        # The bytes of a head still incomplete. A head that began inside this read (pipelined after a body) is not
        # counted until the next read: at most one read's worth too few.
        self._head_bytes += len(data) if was_reading_head else 0
        if self._head_bytes > MAX_HEAD_BYTES:
            self.close(431, f"The request line and headers are larger than {MAX_HEAD_BYTES // 1024} KB.")
            return
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        super().on_headers_complete()
        if not self._idle:  # the request is the app's now: not one to shed
            self.guard.idle.pop(self, None)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._become_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        self._forget()
        super().connection_lost(exc)

    # ----- the guard ----------------------------------------------------------------------------------------------

    @property
    def _idle(self) -> bool:
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    def _become_idle(self) -> None:
        self.guard.idle[self] = time.monotonic()
        self.guard.idle.move_to_end(self)

    def _forget(self) -> None:
        self.guard.idle.pop(self, None)
        if self._counted:
            self._counted = False
            self.guard.open -= 1

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.guard.header_timeout_s, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self._reading_head and self._idle:  # a client that sent nothing at all gets no answer, only the close
            status = 408 if self._head_bytes else None
            self.close(status, "The request line and headers did not arrive in time (HEADER_TIMEOUT_S).")

    def close(self, status: int | None = None, message: str = "") -> None:
        """Close the connection, first answering `status` in the error shape when a request had begun."""
        self._cancel_head_deadline()
        self._forget()
        if self.transport.is_closing():
            return
        if status is not None:
            error = {"message": message, "type": "invalid_request_error", "param": None, "code": status}
            body = json.dumps({"error": error}).encode()
            head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            self.transport.write(head.encode() + body)
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedProtocol]:
    """uvicorn's HTTP protocol with this server's connection cap and head limits (pass it as `http=`)."""
    guard = ConnectionGuard(settings.max_connections, settings.header_timeout_s)
    return type("GuardedHttpProtocol", (GuardedProtocol,), {"guard": guard})
