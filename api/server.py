"""How uvicorn runs the app: its connection limits (app.py's `main` and the tests' live server use the same)."""

from __future__ import annotations

from typing import Any

import uvicorn
from fastapi import FastAPI

from api.connections import guarded_protocol
from inference.settings import Settings


def server_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": settings.server_name,
        "port": settings.server_port,
        "log_level": "warning",
        "http": guarded_protocol(settings),
        # Gradio 6 talks over HTTP and server-sent events only; no WebSocket upgrade to guard.
        "ws": "none",
    }
    return uvicorn.Config(app, **{**options, **overrides})
