"""Thin REST routes: take the engine from app.state, turn requests into engine calls, declare their errors."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.errors import ERROR_RESPONSES, error_response
from inference.engine import Engine, EngineState
from inference.schemas import GenerateRequest, GenerateResponse, HealthResponse, ModelInfo, Timings, Usage
from inference.settings import Settings

router = APIRouter()


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "Loading, failed to load, or shutting down."}},
    tags=["service"],
)
async def health(engine: EngineDep) -> JSONResponse:
    """200 once the model is ready to serve; 503 with the reason while it loads or if loading failed."""
    reason = None
    if engine.state is EngineState.FAILED:
        reason = engine.failure
    elif engine.state is not EngineState.READY:
        reason = f"The model is {engine.state.value}."
    status = "ok" if engine.state is EngineState.READY else engine.state.value
    body = HealthResponse(status=status, model_id=engine.settings.model_id, reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)


@router.get("/model-info", response_model=ModelInfo, responses={503: ERROR_RESPONSES[503]}, tags=["service"])
async def model_info(engine: EngineDep) -> ModelInfo:
    """The model, where it came from, its size and context, and the limits this server enforces."""
    return engine.info()


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={status: ERROR_RESPONSES[status] for status in (413, 422, 429, 503, 504)},
    tags=["generation"],
)
async def generate(
    body: GenerateRequest, request: Request, engine: EngineDep, settings: SettingsDep
) -> GenerateResponse:
    """Continue `prompt` as plain text (no chat template) with the given sampling parameters."""
    params = body.sampling_params(settings)
    prompt = await asyncio.to_thread(engine.prepare_completion, body.prompt)
    result = await engine.generate(prompt, params, request_id=request_id(request), route="/generate")
    return GenerateResponse(
        id=result.request_id,
        model=settings.model_id,
        generated_text=result.text,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
        timings=Timings(
            queue_s=round(result.queue_seconds, 4),
            time_to_first_token_s=round(result.time_to_first_token_seconds, 4),
            generation_s=round(result.generation_seconds, 4),
            total_s=round(result.total_seconds, 4),
            tokens_per_s=round(result.tokens_per_second, 2),
        ),
    )


__all__ = ["error_response", "router"]
