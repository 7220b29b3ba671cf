"""Run the real app (FastAPI + Gradio) under uvicorn in a background thread, on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI

from app import create_app
from inference.settings import Settings


@dataclass
class LiveServer:
    url: str
    app: FastAPI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(
    settings: Settings,
    ready_timeout_s: float = 60.0,
    settled: Callable[[httpx.Response], bool] = lambda health: health.status_code == 200,
) -> Iterator[LiveServer]:
    """Start the app, wait until its /health answer is `settled` (by default: ok), and stop it afterwards."""
    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while True:
        try:
            if settled(httpx.get(f"{url}/health", timeout=2)):
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"server at {url} did not become healthy in {ready_timeout_s} s")
        time.sleep(0.1)
    try:
        yield LiveServer(url, app)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
