"""Run the real app (FastAPI + Gradio) on a free loopback port: under uvicorn in a background thread (`serve`), or as
its own process the way a deployment runs it (`app_process`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from api.server import server_config
from app import create_app
from inference.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


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
    server = uvicorn.Server(server_config(app, settings, host="127.0.0.1", port=port, lifespan="on"))
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


@contextmanager
def app_process(
    environment: dict[str, str], ready_timeout_s: float = 120.0, preexec_fn: Callable[[], None] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python app.py` as a deployment runs it, on a free loopback port, with `environment` on top of this one's;
    yields the process (stdout and stderr together) once /health says ok, and kills it afterwards if still running."""
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        **environment,
    }
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec_fn,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not become healthy: {process.communicate(timeout=10)[0][-3000:]}")
            time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
