"""Holding back the refusals of a client that keeps sending big requests the server must refuse (api/refusals.py):
the budget's arithmetic on a fake clock, the middleware on a small app with a recorded sleep, and the live server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.refusals import RefusalBudget, RefusalThrottleMiddleware
from tests.live_server import LiveServer, serve
from tests.test_edge import assert_error, from_address

MB = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_refusals_within_the_burst_are_never_held() -> None:
    budget = RefusalBudget(bytes_per_s=MB, burst_bytes=8 * MB, max_wait_s=10, clock=FakeClock())
    assert [budget.refused("a", MB) for _ in range(8)] == [0.0] * 8


def test_a_refusal_past_the_burst_waits_for_the_refill_to_cover_it() -> None:
    clock = FakeClock()
    budget = RefusalBudget(bytes_per_s=MB, burst_bytes=8 * MB, max_wait_s=10, clock=clock)
    for _ in range(8):
        budget.refused("a", MB)
    assert budget.refused("a", MB) == pytest.approx(1.0)
    assert budget.refused("a", MB) == pytest.approx(2.0)
    clock.now += 2.0  # what was owed is paid back at 1 MB/s
    assert budget.refused("a", MB) == pytest.approx(1.0)
    clock.now += 60.0  # a quiet minute clears the debt
    assert budget.refused("a", MB) == 0.0


def test_the_wait_is_capped_and_a_client_that_stops_recovers_within_it() -> None:
    clock = FakeClock()
    budget = RefusalBudget(bytes_per_s=MB, burst_bytes=8 * MB, max_wait_s=10, clock=clock)
    waits = [budget.refused("a", 5 * MB) for _ in range(20)]
    assert max(waits) == pytest.approx(10.0)
    assert waits[-1] == pytest.approx(10.0)
    clock.now += 10.0 + 5.0  # the longest wait, plus the time to refill this refusal's 5 MB
    assert budget.refused("a", 5 * MB) == 0.0


def test_each_client_has_its_own_budget() -> None:
    budget = RefusalBudget(bytes_per_s=MB, burst_bytes=MB, max_wait_s=10, clock=FakeClock())
    budget.refused("attacker", 5 * MB)
    assert budget.refused("attacker", MB) > 0
    assert budget.refused("bystander", MB) == 0.0


def test_the_budget_forgets_the_least_recent_clients_beyond_its_size() -> None:
    budget = RefusalBudget(bytes_per_s=MB, burst_bytes=MB, max_wait_s=10, max_clients=3, clock=FakeClock())
    for client in "abcd":
        budget.refused(client, 2 * MB)
    assert list(budget.debts) == ["b", "c", "d"]


# ----- the middleware, on a small app whose sleeps are recorded -----------------------------------------------------


def answering(status: int, read_body: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """A route that reads the body (or not) and answers `status`."""

    async def answer(request: Request) -> Response:
        if read_body:
            await request.body()
        return JSONResponse({"status": status}, status_code=status)

    return answer


class Recorded:
    """A small app behind the middleware, whose holds are recorded instead of slept."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self.budget = RefusalBudget(bytes_per_s=1000, burst_bytes=2000, max_wait_s=5, clock=FakeClock())
        routes = {
            "/refuse": answering(422),
            "/ok": answering(200),
            "/busy": answering(429),
            "/unread": answering(413, False),
        }
        app = Starlette(routes=[Route(path, handler, methods=["POST"]) for path, handler in routes.items()])
        app.add_middleware(RefusalThrottleMiddleware, budget=self.budget, sleep=self.record)
        self.app = app

    async def record(self, seconds: float) -> None:
        self.slept.append(seconds)

    def post(self, path: str, size: int) -> int:
        async def send() -> int:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return (await client.post(path, content=b"x" * size)).status_code

        return asyncio.run(send())

    def owed(self) -> float:
        return self.budget.debts["127.0.0.1"].bytes


def test_refused_bodies_are_charged_and_held_past_the_burst() -> None:
    recorded = Recorded()
    assert [recorded.post("/refuse", 1000) for _ in range(3)] == [422] * 3
    assert recorded.slept == [pytest.approx(1.0)]  # 3,000 bytes refused against a 2,000-byte burst, refilled 1,000/s
    assert recorded.owed() == pytest.approx(3000)


def test_served_requests_and_429s_are_never_held_or_charged() -> None:
    recorded = Recorded()
    for _ in range(5):
        recorded.post("/refuse", 1000)
    assert len(recorded.slept) == 3
    assert recorded.post("/ok", 1000) == 200
    assert recorded.post("/busy", 1000) == 429
    assert len(recorded.slept) == 3
    assert recorded.owed() == pytest.approx(5000)


def test_an_announced_length_is_charged_even_when_the_body_is_not_read() -> None:
    recorded = Recorded()
    assert recorded.post("/unread", 4000) == 413
    assert recorded.owed() == pytest.approx(4000)
    assert recorded.slept == [pytest.approx(2.0)]


# ----- the live server ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thrifty(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    settings = make_settings(
        tiny_llama_dir,
        max_new_tokens=16,
        refused_bytes_per_s=200_000,
        refused_bytes_burst=400_000,
        refusal_max_wait_s=0.5,
    )
    with serve(settings) as live:
        yield live


def test_a_client_sending_big_refused_prompts_is_held_and_others_are_not(
    thrifty: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    huge = {"prompt": "a " * 100_000}  # 200 KB, far over the tiny model's MAX_INPUT_TOKENS in characters alone
    with caplog.at_level(logging.WARNING, logger="api"), from_address(thrifty.url, "127.0.0.1") as attacker:
        for _ in range(4):
            assert_error(attacker.post("/generate", json=huge), 422)
        # served requests from the same client are not held
        served = attacker.post("/generate", json={"prompt": "hello", "max_new_tokens": 2})
        assert served.status_code == 200, served.text
    budget = thrifty.app.state.refusal_budget
    assert budget.debts["127.0.0.1"].bytes > 400_000
    assert budget.debts["127.0.0.1"].held >= 1
    assert any("keeps sending requests that are refused" in record.getMessage() for record in caplog.records)
    with from_address(thrifty.url, "127.0.0.2") as bystander:
        assert_error(bystander.post("/generate", json=huge), 422)
        assert bystander.post("/generate", json={"prompt": "hello", "max_new_tokens": 2}).status_code == 200
    assert budget.debts["127.0.0.2"].held == 0
