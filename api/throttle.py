"""Slowing down key guessing, per client, for the Bearer key and the playground's login alike.

A client whose key was wrong has its next attempts checked one at a time, each after a delay that doubles with every
failure (0.5 s, 1 s, 2 s, ... up to 30 s); an attempt that would wait over a minute gets 429 at once rather than
holding a connection. The wait comes before the check, so parallel guesses gain nothing: a right guess would be
seen no sooner than a wrong one. A right key clears the record, and a quiet quarter of an hour forgets it. Clients
that never sent a wrong key are not slowed at all.

"Client" is the peer address uvicorn reports: behind a proxy, let uvicorn take it from X-Forwarded-For with its
FORWARDED_ALLOW_IPS, or everyone behind the proxy shares one record.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response

LOGIN_PATHS = ("/login", "/login/")


@dataclass
class _Record:
    failures: int
    next_check: float  # when this client's next attempt may be checked (monotonic seconds)


class TooManyFailuresError(HTTPException):
    def __init__(self, wait_s: float, reason: str = "Too many wrong keys from this client") -> None:
        retry_after = max(1, math.ceil(wait_s))
        super().__init__(429, f"{reason}; retry in {retry_after} s.", {"Retry-After": str(retry_after)})


class FailureBackoff:
    def __init__(
        self,
        first_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        max_wait_s: float = 60.0,
        forget_after_s: float = 900.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.max_wait_s = max_wait_s
        self.forget_after_s = forget_after_s
        self.max_clients = max_clients
        self.clock = clock
        self.records: OrderedDict[str, _Record] = OrderedDict()  # least recently failed first

    def delay(self, failures: int) -> float:
        return float(min(self.max_delay_s, self.first_delay_s * 2 ** (failures - 1)))

    async def admit(self, client: str) -> None:
        """Wait for this client's turn to have a key checked; raise TooManyFailuresError if that is too far off.

        Call `failed` or `succeeded` right after the check, with no await in between: the next attempt's turn is
        decided by what this one's check found."""
        record = self.records.get(client)
        if record is None:
            return
        now = self.clock()
        turn = max(now, record.next_check)
        if turn - now > self.max_wait_s:
            raise TooManyFailuresError(turn - now)
        record.next_check = turn + self.delay(record.failures)  # the attempt after this one waits its own delay
        if turn > now:
            await asyncio.sleep(turn - now)

    def failed(self, client: str) -> None:
        now = self.clock()
        record = self.records.pop(client, None) or _Record(failures=0, next_check=now)
        record.failures += 1
        record.next_check = max(record.next_check, now + self.delay(record.failures))
        self.records[client] = record
        self._forget_old(now)

    def succeeded(self, client: str) -> None:
        self.records.pop(client, None)

    def _forget_old(self, now: float) -> None:
        while self.records:
            client, oldest = next(iter(self.records.items()))
            if len(self.records) <= self.max_clients and now - oldest.next_check < self.forget_after_s:
                return
            del self.records[client]


def client_of(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


async def refuse(refusal: TooManyFailuresError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(429, str(refusal.detail), "invalid_request_error", headers=refusal.headers)
    await response(scope, receive, send)


class LoginBackoffMiddleware:
    """The same back-off for the playground's login form (Gradio's `POST /login`, which answers 400 to a wrong
    password), plus one attempt at a time per client: nobody logs in twice at once."""

    def __init__(self, app: ASGIApp, backoff: FailureBackoff) -> None:
        self.app = app
        self.backoff = backoff
        self.attempting: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in LOGIN_PATHS:
            await self.app(scope, receive, send)
            return
        client = client_of(scope)
        if client in self.attempting:
            refusal = TooManyFailuresError(self.backoff.first_delay_s, "One login attempt at a time")
            await refuse(refusal, scope, receive, send)
            return
        self.attempting.add(client)
        status = 0

        async def watching_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            try:
                await self.backoff.admit(client)
            except TooManyFailuresError as refusal:
                await refuse(refusal, scope, receive, send)
                return
            await self.app(scope, receive, watching_send)
            if status == 400:
                self.backoff.failed(client)
            elif status == 200:
                self.backoff.succeeded(client)
        finally:
            self.attempting.discard(client)
