"""Text Generation Inference's routes: `POST /generate_stream`, `POST /` and `GET /info` here, and `/generate` with
TGI's `inputs` body (api/routes.py hands it to `generate_tgi`). Same engine, same errors as every other route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.sse import EventSourceResponse

from api.auth import AuthFirstRoute
from api.deps import EngineDep, SettingsDep, request_id, timing_headers
from api.errors import ERROR_RESPONSES
from api.sse import sse_response
from api.tgi_protocol import (
    TGI_FINISH_REASONS,
    TGIDetails,
    TGIInfo,
    TGIRequest,
    TGIResponse,
    TGIStreamDetails,
    TGIStreamEvent,
    TGIToken,
)
from inference import __version__
from inference.client import EngineClient, GenerationResult, RequestHandleBase, TextChunk
from inference.settings import Settings

router = APIRouter(route_class=AuthFirstRoute, tags=["tgi"])
RESPONSES: dict[int | str, dict[str, Any]] = {status: ERROR_RESPONSES[status] for status in (413, 422, 429, 503, 504)}
STREAM_DESCRIPTION = (
    "Server-sent events, one per generated token: `data: {index, token: {id, text, logprob, special}, "
    "generated_text, details}`; the last one carries `generated_text` and `details`."
)


async def submit(
    body: TGIRequest, engine: EngineClient, settings: Settings, request: Request, streamed: bool
) -> RequestHandleBase:
    params = body.parameters.sampling_params(settings, streamed)
    prompt = await engine.tokenize_completion(body.inputs, param="inputs")
    truncate = body.parameters.truncate
    if truncate is not None and len(prompt.token_ids) > truncate:
        prompt = replace(prompt, token_ids=prompt.token_ids[-truncate:])
    return engine.submit(prompt, params, request_id=request_id(request), route=str(request.url.path))


def tokens_of(engine: EngineClient, token_ids: tuple[int, ...], logprobs: tuple[float, ...]) -> list[TGIToken]:
    special = engine.special_token_ids()
    texts = engine.token_texts(list(token_ids))
    return [
        TGIToken(id=token, text=text, logprob=logprob, special=token in special)
        for token, text, logprob in zip(token_ids, texts, logprobs, strict=True)
    ]


def to_response(body: TGIRequest, result: GenerationResult, engine: EngineClient) -> TGIResponse:
    text = body.inputs + result.text if body.parameters.return_full_text else result.text
    if not body.parameters.details:
        return TGIResponse(generated_text=text)
    details = TGIDetails(
        finish_reason=TGI_FINISH_REASONS[result.finish_reason],  # type: ignore[arg-type]
        generated_tokens=result.completion_tokens,
        seed=result.seed,
        tokens=tokens_of(engine, result.token_ids, result.logprobs),
    )
    return TGIResponse(generated_text=text, details=details)


async def generate_tgi(
    body: TGIRequest, request: Request, response: Response, engine: EngineClient, settings: Settings
) -> TGIResponse | EventSourceResponse:
    """`/generate` with TGI's body: TGI's answer, or its token events with `"stream": true`."""
    handle = await submit(body, engine, settings, request, streamed=body.stream)
    if body.stream:
        return sse_response(stream_events(body, handle, engine), {"x-request-id": handle.request_id})
    result = await handle.result()
    response.headers.update(timing_headers([result]))
    return to_response(body, result, engine)


async def stream_events(
    body: TGIRequest, handle: RequestHandleBase, engine: EngineClient
) -> AsyncIterator[TGIStreamEvent]:
    """One event per token. A chunk of text may complete several tokens: its text goes with the last of them (so
    the events' texts add up to the answer); the last event also carries the whole text and the details."""
    special = engine.special_token_ids()
    held: TGIStreamEvent | None = None  # each event waits for the next, so the last can take the details
    index = 0

    def events_for(text: str, token_ids: tuple[int, ...], logprobs: tuple[float, ...]) -> list[TGIStreamEvent]:
        nonlocal index
        events = []
        for position, (token, logprob) in enumerate(zip(token_ids, logprobs, strict=True)):
            index += 1
            piece = text if position == len(token_ids) - 1 else ""
            events.append(
                TGIStreamEvent(
                    index=index, token=TGIToken(id=token, text=piece, logprob=logprob, special=token in special)
                )
            )
        return events

    async for event in handle.events():
        if isinstance(event, TextChunk):
            new = events_for(event.text, event.token_ids, event.logprobs)
        else:
            # tokens no chunk carried (an end-of-sequence token, say) come last, without text
            reported = index
            new = events_for("", event.token_ids[reported:], event.logprobs[reported:])
        for item in new:
            if held is not None:
                yield held
            held = item
        if isinstance(event, GenerationResult):
            assert held is not None, "a request generates at least one token"
            held.generated_text = body.inputs + event.text if body.parameters.return_full_text else event.text
            held.details = TGIStreamDetails(
                finish_reason=TGI_FINISH_REASONS[event.finish_reason],  # type: ignore[arg-type]
                generated_tokens=event.completion_tokens,
                seed=event.seed,
                input_length=event.prompt_tokens,
            )
            yield held


@router.post(
    "/generate_stream",
    responses={200: {"content": {"text/event-stream": {}}, "description": STREAM_DESCRIPTION}, **RESPONSES},
)
async def generate_stream(
    body: TGIRequest, request: Request, engine: EngineDep, settings: SettingsDep
) -> EventSourceResponse:
    """TGI's streaming route: the answer token by token."""
    handle = await submit(body, engine, settings, request, streamed=True)
    return sse_response(stream_events(body, handle, engine), {"x-request-id": handle.request_id})


@router.post(
    "/",
    response_model=list[TGIResponse],
    responses={200: {"content": {"text/event-stream": {}}, "description": STREAM_DESCRIPTION}, **RESPONSES},
)
async def compat_generate(
    body: TGIRequest, request: Request, response: Response, engine: EngineDep, settings: SettingsDep
) -> list[TGIResponse] | EventSourceResponse:
    """TGI's `POST /`, where `InferenceClient(base_url=...).text_generation` sends: a list of one answer, or token
    events with `"stream": true`."""
    answer = await generate_tgi(body, request, response, engine, settings)
    return answer if isinstance(answer, EventSourceResponse) else [answer]


@router.get("/info", response_model=TGIInfo, responses={503: ERROR_RESPONSES[503]})
async def info(engine: EngineDep, settings: SettingsDep) -> TGIInfo:
    """TGI's `/info`: the model served and the limits that apply."""
    model = engine.info()
    return TGIInfo(
        model_id=model.model_id,
        model_dtype=model.dtype,
        model_device_type=model.device,
        max_concurrent_requests=settings.max_batch_size + settings.max_queue_size,
        max_stop_sequences=settings.max_stop_sequences,
        max_input_tokens=settings.max_input_tokens,
        max_total_tokens=settings.max_input_tokens + settings.max_new_tokens,
        max_batch_size=settings.max_batch_size,
        validation_workers=settings.max_concurrent_tokenizing,
        version=__version__,
    )
