"""How uvicorn runs the app: its connection limits, and a shutdown that answers every request it accepted.

app.py's `main` and the tests' live server use the same configuration.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.routing import Mount

from api.connections import guarded_protocol
from inference.client import EngineClient
from inference.settings import Settings

logger = logging.getLogger("app")
# Once the grace period is over and every remaining request has been answered with its error, the time uvicorn gives
# those answers to reach the clients before it closes their connections.
FLUSH_S = 5


def server_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": settings.server_name,
        "port": settings.server_port,
        "log_level": "warning",
        "http": guarded_protocol(settings),
        # Gradio 6 talks over HTTP and server-sent events only; no WebSocket upgrade to guard.
        "ws": "none",
        "timeout_graceful_shutdown": FLUSH_S,
    }
    return uvicorn.Config(app, **{**options, **overrides})


class DrainingServer(uvicorn.Server):
    """On SIGTERM or Ctrl-C, for SHUTDOWN_GRACE_S (or until nothing runs): the listener stays open, running and
    waiting requests go on, new work gets 503 and /health/ready says `draining`. Then the requests still unfinished
    get a 503 in the error shape (or a last error event, on a stream), and only then does uvicorn close the listener
    and exit 0. A second signal ends the grace period at once; a third quits without waiting."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient, grace_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not passed on to uvicorn, which would close the listener now and re-raise the signal at the end (the
        # process would then die "by SIGTERM" rather than exit 0, as orchestrators expect of a clean shutdown).
        if sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
        elif self.drain_deadline is None:
            self.engine.drain()
            self.drain_deadline = time.monotonic() + self.grace_s
        elif not self.should_exit:
            self.drain_deadline = time.monotonic()
        else:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            snapshot = self.engine.snapshot()
            unfinished = snapshot["running"] + snapshot["waiting"]
            if not unfinished or time.monotonic() >= self.drain_deadline:
                if unfinished:
                    logger.info("Grace period over: %d requests still unfinished get 503", unfinished)
                # fails what is left with NotReadyError, which the routes answer as 503 (or a last stream event)
                await asyncio.to_thread(self.engine.shutdown)
                if isinstance(self.config.app, FastAPI):  # the app handed to server_config, as it always is here
                    end_gradio_streams(self.config.app)
                self.should_exit = True
        return await super().on_tick(counter)


def end_gradio_streams(app: FastAPI) -> None:
    """End the playground's heartbeat streams, which only end when their browser tab closes; uvicorn would otherwise
    wait for them, then cancel them with a traceback each. Gradio's own `launch()` ends them the same way (its
    `stop_event`); a mounted app has no such hook. tests/test_reliability.py fails if Gradio changes this."""
    for route in app.routes:
        if isinstance(route, Mount) and hasattr(route.app, "stop_event"):
            route.app.stop_event.set()
