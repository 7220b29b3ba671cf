"""Thin REST routes: take the engine from app.state, turn requests into engine calls, declare their errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi.sse import EventSourceResponse
from pydantic import Discriminator, Tag

from api.auth import AuthFirstRoute
from api.deps import EngineDep, SettingsDep, request_id, timing_headers
from api.errors import ERROR_RESPONSES
from api.protocol import (
    GenerateRequest,
    GenerateResponse,
    StreamDone,
    StreamText,
    Timings,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from api.sse import sse_response
from api.tgi import generate_tgi
from api.tgi_protocol import TGIRequest, TGIResponse
from inference.client import GenerationResult, TextChunk
from inference.errors import InvalidRequestError
from inference.prompts import ChatMessage
from inference.schemas import ModelInfo

router = APIRouter(route_class=AuthFirstRoute)


def _body_shape(body: Any) -> str:
    return "[tgi]" if isinstance(body, dict) and "inputs" in body else "[rest]"


# /generate's two dialects, told apart by `inputs` (TGI) or `prompt` (this server's own). The tags are bracketed so
# that error messages, which name the place in the request, leave them out (api/errors.py).
GenerateBody = Annotated[
    Annotated[GenerateRequest, Tag("[rest]")] | Annotated[TGIRequest, Tag("[tgi]")], Discriminator(_body_shape)
]


@router.get("/model-info", response_model=ModelInfo, responses={503: ERROR_RESPONSES[503]}, tags=["service"])
async def model_info(engine: EngineDep) -> ModelInfo:
    """The model, where it came from, its size and context, and the limits this server enforces."""
    return engine.info()


def to_response(result: GenerationResult, model: str) -> GenerateResponse:
    return GenerateResponse(
        id=result.request_id,
        model=model,
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


STREAM_DESCRIPTION = (
    'With `"stream": true`: server-sent events, `data: {"type": "text", "text", "completion_tokens"}` for each new '
    'piece of text, then `data: {"type": "done", ...}` with the whole response (as without streaming); an error after '
    'the stream began arrives as `data: {"error": {...}}`.'
)


@router.post(
    "/generate",
    response_model=GenerateResponse | TGIResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": STREAM_DESCRIPTION},
        **{status: ERROR_RESPONSES[status] for status in (413, 422, 429, 503, 504)},
    },
    tags=["generation"],
)
async def generate(
    body: GenerateBody, request: Request, response: Response, engine: EngineDep, settings: SettingsDep
) -> GenerateResponse | TGIResponse | EventSourceResponse:
    """Continue `prompt` as plain text (no chat template) with the given sampling parameters. A body with `inputs`
    (and `parameters`) is Text Generation Inference's request, and gets TGI's answer."""
    if isinstance(body, TGIRequest):
        return await generate_tgi(body, request, response, engine, settings)
    params = body.sampling_params(settings)
    prompt = await engine.tokenize_completion(body.prompt)
    handle = engine.submit(prompt, params, request_id=request_id(request), route="/generate")
    if not body.stream:
        result = await handle.result()
        response.headers.update(timing_headers([result]))
        return to_response(result, settings.model_id)

    async def events() -> AsyncIterator[StreamText | StreamDone]:
        async for event in handle.events():
            if isinstance(event, TextChunk):
                yield StreamText(text=event.text, completion_tokens=event.completion_tokens)
            else:
                yield StreamDone(**to_response(event, settings.model_id).model_dump())

    return sse_response(events(), {"x-request-id": handle.request_id})


@router.post("/tokenize", response_model=TokenizeResponse, responses={422: ERROR_RESPONSES[422]}, tags=["generation"])
async def tokenize(body: TokenizeRequest, engine: EngineDep, settings: SettingsDep) -> TokenizeResponse:
    """Token ids, pieces and count of a prompt (as /generate sees it) or of messages (with the chat template)."""
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of `prompt` and `messages`", param="prompt")
    if body.prompt is not None:
        prepared = await engine.tokenize_completion(body.prompt)
    else:
        messages: list[ChatMessage] = [{"role": m.role, "content": m.content} for m in body.messages or []]
        prepared = await engine.tokenize_chat(messages)
    ids = prepared.token_ids
    return TokenizeResponse(
        count=len(ids),
        tokens=ids,
        pieces=engine.token_pieces(ids),
        max_input_tokens=settings.max_input_tokens,
        fits=len(ids) <= settings.max_input_tokens,
    )
