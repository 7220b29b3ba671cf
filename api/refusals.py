"""Holding back the refusals of a client that keeps sending big requests the server must refuse.

Refusing a request is cheap, but reading its body is not: a client that sends 1 MB prompts as fast as each is
refused keeps the event loop reading and parsing megabytes a second, on the cores the model needs (six such clients
made a normal request 3-4x slower on two cores, docs/benchmarks-attack.md). So each client has a budget of refused
request bytes, which refills at REFUSED_BYTES_PER_S up to REFUSED_BYTES_BURST: a refusal (any 4xx but 429) costs the
larger of the body's bytes read and the length it announced, and one that overdraws the budget is answered only once
the budget has refilled, at most REFUSAL_MAX_WAIT_S later. A client that waits for each answer (as HTTP clients do)
then sends at most REFUSED_BYTES_PER_S of requests it knows will fail; many connections at once each wait the
longest, and MAX_CONNECTIONS bounds how many.

Nothing else is slowed: requests that are served are never held, even from a client in debt; a client refused now
and then never overdraws (a 1 MB body mistake costs 1 of the burst's 8 MB); small refusals (a wrong parameter, an
unknown path) cost their few bytes. 429s are not counted: they say the server is busy, not that the client is wrong.

"Client" is the peer address, as for the key-guessing back-off (api/throttle.py): clients behind one proxy share a
budget unless uvicorn takes their addresses from X-Forwarded-For (FORWARDED_ALLOW_IPS).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.throttle import client_of

logger = logging.getLogger("api")


@dataclass
class _Debt:
    bytes: float  # refused bytes not yet paid back by the refill
    at: float  # when `bytes` was last brought up to date (monotonic seconds)
    held: int = 0  # refusals held back so far, for the log


class RefusalBudget:
    """Per client, refused bytes owed; how long a new refusal must wait for the budget to cover it."""

    def __init__(
        self,
        bytes_per_s: float,
        burst_bytes: float,
        max_wait_s: float,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bytes_per_s = bytes_per_s
        self.burst_bytes = burst_bytes
        self.max_wait_s = max_wait_s
        self.max_clients = max_clients
        self.clock = clock
        self.debts: OrderedDict[str, _Debt] = OrderedDict()  # least recently refused first

    def refused(self, client: str, size: int) -> float:
        """Charge a refusal of `size` bytes to `client`; return the seconds its answer must wait (0 when covered)."""
        now = self.clock()
        debt = self.debts.pop(client, None) or _Debt(bytes=0.0, at=now)
        debt.bytes = max(0.0, debt.bytes - (now - debt.at) * self.bytes_per_s) + size
        debt.at = now
        # A debt is never more than one longest wait over the burst, so a client that stops recovers within it.
        debt.bytes = min(debt.bytes, self.burst_bytes + self.max_wait_s * self.bytes_per_s)
        wait = max(0.0, (debt.bytes - self.burst_bytes) / self.bytes_per_s)
        if wait > 0:
            debt.held += 1
            if debt.held == 1 or debt.held % 1000 == 0:  # an attack is worth a line in the log, not one per request
                logger.warning(
                    "Client %s keeps sending requests that are refused (%.1f MB over REFUSED_BYTES_BURST): its "
                    "refusals are answered after up to %.0f s (%d so far)",
                    client,
                    (debt.bytes - self.burst_bytes) / 1e6,
                    self.max_wait_s,
                    debt.held,
                )
        self.debts[client] = debt
        while len(self.debts) > self.max_clients:
            self.debts.popitem(last=False)
        return wait


class RefusalThrottleMiddleware:
    """Counts each request's body bytes; when the answer is a refusal, charges them to the client and holds the
    answer until its budget covers them."""

    def __init__(
        self,
        app: ASGIApp,
        budget: RefusalBudget,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.app = app
        self.budget = budget
        self.sleep = sleep

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        # A body refused for its announced length is never read, but the client sent it (or could have) all the same.
        announced = int(declared) if declared.isdigit() and len(declared) < 19 else 0
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def holding_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if 400 <= status < 500 and status != 429:
                    wait = self.budget.refused(client_of(scope), max(received, announced))
                    if wait > 0:
                        await self.sleep(wait)
            await send(message)

        await self.app(scope, counting_receive, holding_send)
