"""Probes and metrics: always open (no API key), cheap, and answered while the model generates."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.deps import EngineDep
from api.protocol import HealthResponse, HealthStatus
from inference.client import EngineClient, EngineState
from inference.settings import Settings

router = APIRouter(tags=["service"])
NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": HealthResponse, "description": "Loading, failed to load, or shutting down."}
}


def public_model_name(settings: Settings) -> str:
    """The model's name without the server's file paths: a folder's own name, or the hub id."""
    folder = Path(settings.model_id).expanduser()
    return folder.name if folder.is_dir() else settings.model_id


def health_body(engine: EngineClient) -> tuple[HealthResponse, int]:
    """Open to anyone, even with API_KEY set: no file paths here (the log has the whole failure)."""
    ready = engine.ready
    reason: str | None
    if engine.state is EngineState.FAILED:
        reason = "The model failed to load; the server log says why."
    elif engine.state is EngineState.DRAINING:
        reason = "The server is shutting down."
    else:
        reason = None if ready else f"The model is {engine.state.value}."
    # every state but READY is named in HealthStatus as it is
    status = cast(HealthStatus, "ok" if ready else engine.state.value)
    body = HealthResponse(status=status, model_id=public_model_name(engine.settings), reason=reason)
    return body, 200 if ready else 503


@router.get("/health", response_model=HealthResponse, responses=NOT_READY)
async def health(engine: EngineDep) -> JSONResponse:
    """200 once the model is ready to serve; 503 with the reason while it loads, if loading failed, or while
    shutting down."""
    body, status = health_body(engine)
    return JSONResponse(body.model_dump(), status_code=status)


@router.get("/health/ready", response_model=HealthResponse, responses=NOT_READY)
async def ready(engine: EngineDep) -> JSONResponse:
    """Readiness probe: the model is loaded and the server is not draining (same answer as /health)."""
    body, status = health_body(engine)
    return JSONResponse(body.model_dump(), status_code=status)


@router.get("/health/live")
async def live() -> dict[str, str]:
    """Liveness probe: the process is up and its event loop answers, whatever the model is doing."""
    return {"status": "alive"}


# Probes answer HEAD too (some load balancers and uptime checkers send only HEAD); kept out of the OpenAPI spec, where
# it would repeat each GET.
for path, probe in (("/health", health), ("/health/ready", ready), ("/health/live", live)):
    router.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics, in the text exposition format."""
    return request.app.state.metrics.render()  # type: ignore[no-any-return]
