"""What several routers share: the engine and settings from app.state, the request id, TGI-style timing headers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from inference.client import EngineClient, GenerationResult
from inference.settings import Settings


# async, though they don't await: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request
# (a tenth of the server's time on a request refused at once, measured with py-spy).
async def get_engine(request: Request) -> EngineClient:
    engine: EngineClient = request.app.state.engine
    return engine


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))


EngineDep = Annotated[EngineClient, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def timing_headers(results: list[GenerationResult]) -> dict[str, str]:
    """TGI-style timing headers (for several choices: the slowest one's times, all choices' tokens)."""
    generated = sum(result.completion_tokens for result in results)
    inference = max(result.generation_seconds for result in results)
    return {
        "x-queue-time": f"{max(result.queue_seconds for result in results):.4f}",
        "x-inference-time": f"{inference:.4f}",
        "x-time-per-token": f"{inference / max(1, max(r.completion_tokens for r in results)):.4f}",
        "x-prompt-tokens": str(results[0].prompt_tokens),
        "x-generated-tokens": str(generated),
    }
