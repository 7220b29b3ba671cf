"""OpenAI-compatible routes, so the official `openai` clients (and tools built on them) work against this server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.sse import EventSourceResponse

from api.auth import AuthFirstRoute
from api.deps import EngineDep, SettingsDep, request_id, timing_headers
from api.errors import ERROR_RESPONSES
from api.openai_protocol import (
    OPENAI_FINISH_REASONS,
    OPENAI_NAMES,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    OpenAIUsage,
    SamplingFields,
    TopLogprob,
)
from api.sse import sse_response
from inference.client import (
    Alternatives,
    EngineClient,
    GenerationResult,
    RequestHandleBase,
    TextChunk,
    TokenLogprob,
    check_lengths,
)
from inference.errors import EngineError, NotReadyError, UnknownModelError
from inference.prompts import PreparedPrompt
from inference.settings import Settings

router = APIRouter(route_class=AuthFirstRoute, prefix="/v1", tags=["openai"])
STARTED = int(time.time())
RESPONSES: dict[int | str, dict[str, Any]] = {
    status: ERROR_RESPONSES[status] for status in (404, 413, 422, 429, 503, 504)
}
DONE = "[DONE]"


def served_names(settings: Settings) -> set[str]:
    """The model id, and its last path part (`SmolLM2-135M-Instruct`), are both accepted as `model`."""
    return {settings.model_id, settings.model_id.rstrip("/").split("/")[-1]}


def check_model(body: SamplingFields, settings: Settings) -> None:
    """With STRICT_MODEL_NAME, only the served model's names are accepted; otherwise the one model serves any name."""
    if settings.strict_model_name and body.model not in served_names(settings):
        raise UnknownModelError(body.model, settings.model_id)


def usage_of(results: list[GenerationResult], prompt_tokens: int) -> OpenAIUsage:
    completion = sum(result.completion_tokens for result in results)
    return OpenAIUsage(
        prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
    )


def submit_all(
    engine: EngineClient,
    settings: Settings,
    body: SamplingFields,
    prompts: list[PreparedPrompt],
    max_tokens: int | None,
    request: Request,
    route: str,
) -> list[RequestHandleBase]:
    """One engine request per (prompt, choice); if one is refused, those already queued are cancelled."""
    handles: list[RequestHandleBase] = []
    try:
        for prompt in prompts:
            for choice in range(body.n):
                params = body.sampling_params(settings, max_tokens, choice)
                # the engine checks the lengths too, but under its own name for max_tokens
                check_lengths(
                    settings, engine.context_length, len(prompt.token_ids), params, OPENAI_NAMES["max_new_tokens"]
                )
                handles.append(engine.submit(prompt, params, request_id=request_id(request), route=route))
    except EngineError:
        for handle in handles:
            handle.cancel()
        raise
    return handles


class UsageSoFar:
    """Tokens counted as a stream goes, for `stream_options.continuous_usage_stats` (None when not asked for)."""

    def __init__(self, prompt_tokens: int, choices: int, wanted: bool) -> None:
        self.prompt_tokens, self.wanted = prompt_tokens, wanted
        self.generated = [0] * choices

    def add(self, index: int, completion_tokens: int) -> OpenAIUsage | None:
        self.generated[index] = completion_tokens
        if not self.wanted:
            return None
        completion = sum(self.generated)
        return OpenAIUsage(
            prompt_tokens=self.prompt_tokens, completion_tokens=completion, total_tokens=self.prompt_tokens + completion
        )


async def merged_events(
    handles: list[RequestHandleBase],
) -> AsyncIterator[tuple[int, TextChunk | GenerationResult]]:
    """Events of several requests as they come, tagged with the request's index; closing it cancels them all."""
    queue: asyncio.Queue[tuple[int, TextChunk | GenerationResult | EngineError | None]] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandleBase) -> None:
        try:
            async for event in handle.events():
                await queue.put((index, event))
        except EngineError as error:
            await queue.put((index, error))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(index, handle)) for index, handle in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            index, event = await queue.get()
            if event is None:
                remaining -= 1
            elif isinstance(event, EngineError):
                raise event
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()
        for handle in handles:
            handle.cancel()


async def results_of(handles: list[RequestHandleBase]) -> list[GenerationResult]:
    results: list[GenerationResult | None] = [None] * len(handles)
    async for index, event in merged_events(handles):
        if isinstance(event, GenerationResult):
            results[index] = event
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]


def scores_of(logprobs: tuple[float, ...], tops: tuple[Alternatives, ...]) -> list[TokenLogprob]:
    """Generated tokens' log-probabilities with their alternatives (none where no alternatives were asked for)."""
    return [TokenLogprob(logprob, tops[i] if i < len(tops) else ()) for i, logprob in enumerate(logprobs)]


def legacy_logprobs(
    engine: EngineClient, token_ids: list[int], scores: Sequence[TokenLogprob | None], first_offset: int
) -> CompletionLogprobs:
    """OpenAI's legacy logprobs object for these tokens, the first one's text starting at `first_offset`."""
    texts = engine.token_texts(token_ids)
    offsets, offset = [], first_offset
    for text in texts:
        offsets.append(offset)
        offset += len(text)

    def alternatives(score: TokenLogprob | None) -> dict[str, float] | None:
        if score is None:
            return None
        pieces = engine.token_texts([token for token, _ in score.top])
        top: dict[str, float] = {}
        for piece, (_, logprob) in zip(pieces, score.top, strict=True):
            top.setdefault(piece, logprob)  # tokens that read alike (pieces of a character): the likeliest stays
        return top

    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[None if score is None else score.logprob for score in scores],
        top_logprobs=[alternatives(score) for score in scores],
        text_offset=offsets,
    )


def completion_logprobs(
    engine: EngineClient, prompt: PreparedPrompt, result: GenerationResult, echo: bool, echo_length: int
) -> CompletionLogprobs:
    """One choice's logprobs: the prompt's tokens first with `echo`, then every generated token (an end-of-sequence
    one included, as lm-evaluation-harness counts on)."""
    scores = scores_of(result.logprobs, result.top_logprobs)
    if echo:
        return legacy_logprobs(engine, prompt.token_ids + list(result.token_ids), [*result.prompt_logprobs, *scores], 0)
    return legacy_logprobs(engine, list(result.token_ids), scores, echo_length)


def chat_logprobs(engine: EngineClient, token_ids: list[int], scores: list[TokenLogprob]) -> ChatLogprobs:
    """OpenAI's chat logprobs for these generated tokens (an end-of-sequence one included): each one's text, bytes,
    log-probability and alternatives."""

    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = engine.token_texts([token_id])[0]
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for token_id, score in zip(token_ids, scores, strict=True):
        chosen = entry(token_id, score.logprob)
        alternatives = [entry(alternative, value) for alternative, value in score.top]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


class StreamedTokens:
    """Per choice of a stream: how many of its tokens the chunks have carried (the tokens no chunk carried, an
    end-of-sequence one say, go out with its last chunk) and where the next one's text starts."""

    def __init__(self, offsets: list[int]) -> None:
        self.sent = [0] * len(offsets)
        self.offset = list(offsets)

    def take(self, index: int, event: TextChunk | GenerationResult) -> tuple[list[int], list[TokenLogprob]]:
        """The tokens of `event` not sent yet, with their scores; from now on they count as sent."""
        start = 0 if isinstance(event, TextChunk) else self.sent[index]
        token_ids, scores = list(event.token_ids[start:]), scores_of(event.logprobs[start:], event.top_logprobs[start:])
        self.sent[index] += len(token_ids)
        return token_ids, scores

    def legacy(self, engine: EngineClient, index: int, event: TextChunk | GenerationResult) -> CompletionLogprobs:
        token_ids, scores = self.take(index, event)
        logprobs = legacy_logprobs(engine, token_ids, scores, self.offset[index])
        self.offset[index] += sum(len(text) for text in logprobs.tokens)
        return logprobs

    def chat(self, engine: EngineClient, index: int, event: TextChunk | GenerationResult) -> ChatLogprobs:
        return chat_logprobs(engine, *self.take(index, event))


def model_card(settings: Settings) -> ModelCard:
    return ModelCard(id=settings.model_id, created=STARTED, owned_by="llm-serving")


@router.get("/models", response_model=ModelList)
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelList:
    """The one model this server serves, once it is loaded (an empty list while it loads or if it failed)."""
    return ModelList(data=[model_card(settings)] if engine.serving else [])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses={s: ERROR_RESPONSES[s] for s in (404, 503)})
async def retrieve_model(model_id: str, engine: EngineDep, settings: SettingsDep) -> ModelCard:
    """The served model's card (its id, or the id's last part, as `model` accepts); 404 for any other id."""
    if model_id not in served_names(settings):
        raise UnknownModelError(model_id, settings.model_id)
    if not engine.serving:
        raise NotReadyError(f"The model is {engine.state.value}, not serving yet.")
    return model_card(settings)


@router.post("/completions", response_model=Completion, responses=RESPONSES)
async def completions(
    body: CompletionRequest, request: Request, response: Response, engine: EngineDep, settings: SettingsDep
) -> Completion | EventSourceResponse:
    """OpenAI text completion: plain prompts, no chat template."""
    check_model(body, settings)
    given = body.prompts
    body.check_size(settings, len(given))
    prompts = [
        engine.prepare_token_ids(text) if isinstance(text, list) else await engine.tokenize_completion(text)
        for text in given
    ]
    handles = submit_all(engine, settings, body, prompts, body.max_tokens, request, "/v1/completions")
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    # choices come prompt by prompt, `n` of each: what each choice echoes
    echoes = [text if isinstance(text, str) else engine.decode(text) for text in given for _ in range(body.n)]
    prompt_of = [prompt for prompt in prompts for _ in range(body.n)]

    def choice_of(index: int, result: GenerationResult) -> CompletionChoice:
        echo = echoes[index] if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(engine, prompt_of[index], result, body.echo, len(echoes[index]))
        reason = OPENAI_FINISH_REASONS[result.finish_reason]
        return CompletionChoice(index=index, text=echo + result.text, finish_reason=reason, logprobs=logprobs)

    def chunk(
        index: int,
        text: str,
        finish_reason: str | None,
        usage: OpenAIUsage | None = None,
        logprobs: CompletionLogprobs | None = None,
    ) -> str:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=logprobs)
        return body.chunk_json(
            Completion(id=completion_id, created=created, model=settings.model_id, choices=[choice], usage=usage)
        )

    if not body.stream:
        results = await results_of(handles)
        response.headers.update(timing_headers(results))
        choices = [choice_of(index, result) for index, result in enumerate(results)]
        return Completion(
            id=completion_id,
            created=created,
            model=settings.model_id,
            choices=choices,
            usage=usage_of(results, prompt_tokens),
        )

    async def events() -> AsyncIterator[str]:
        results: list[GenerationResult] = []
        usage = UsageSoFar(prompt_tokens, len(handles), body.continuous_usage)
        streamed = StreamedTokens([len(echo) for echo in echoes])
        if body.echo:
            for index, echo in enumerate(echoes):
                yield chunk(index, echo, None, usage.add(index, 0))
        async for index, event in merged_events(handles):
            logprobs = streamed.legacy(engine, index, event) if body.logprobs is not None else None
            if isinstance(event, TextChunk):
                yield chunk(index, event.text, None, usage.add(index, event.completion_tokens), logprobs)
            else:
                results.append(event)
                reason = OPENAI_FINISH_REASONS[event.finish_reason]
                yield chunk(index, "", reason, usage.add(index, event.completion_tokens), logprobs)
        if body.include_usage:
            final = Completion(
                id=completion_id,
                created=created,
                model=settings.model_id,
                choices=[],
                usage=usage_of(results, prompt_tokens),
            )
            yield final.model_dump_json()
        yield DONE

    return sse_response(events(), {})


@router.post("/chat/completions", response_model=ChatCompletion, responses=RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, response: Response, engine: EngineDep, settings: SettingsDep
) -> ChatCompletion | EventSourceResponse:
    """OpenAI chat completion, with the model's chat template (or a plain transcript for base models)."""
    check_model(body, settings)
    body.check_size(settings, 1)
    prompt = await engine.tokenize_chat(body.chat_messages)
    handles = submit_all(engine, settings, body, [prompt], body.max_new_tokens, request, "/v1/chat/completions")
    prompt_tokens = len(prompt.token_ids)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: OpenAIUsage | None = None) -> str:
        return body.chunk_json(
            ChatCompletionChunk(
                id=completion_id, created=created, model=settings.model_id, choices=choices, usage=usage
            )
        )

    if not body.stream:
        results = await results_of(handles)
        response.headers.update(timing_headers(results))
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=r.text),
                finish_reason=OPENAI_FINISH_REASONS[r.finish_reason],
                logprobs=chat_logprobs(engine, list(r.token_ids), scores_of(r.logprobs, r.top_logprobs))
                if body.logprobs
                else None,
            )
            for i, r in enumerate(results)
        ]
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=settings.model_id,
            choices=choices,
            usage=usage_of(results, prompt_tokens),
        )

    async def events() -> AsyncIterator[str]:
        usage = UsageSoFar(prompt_tokens, len(handles), body.continuous_usage)
        roles = [ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(len(handles))]
        yield chunk(roles, usage.add(0, 0))
        results: list[GenerationResult] = []
        streamed = StreamedTokens([0] * len(handles))
        async for index, event in merged_events(handles):
            logprobs = streamed.chat(engine, index, event) if body.logprobs else None
            if isinstance(event, TextChunk):
                choice = ChatChunkChoice(index=index, delta=Delta(content=event.text), logprobs=logprobs)
                yield chunk([choice], usage.add(index, event.completion_tokens))
            else:
                results.append(event)
                reason = OPENAI_FINISH_REASONS[event.finish_reason]
                finished = ChatChunkChoice(index=index, delta=Delta(), finish_reason=reason, logprobs=logprobs)
                yield chunk([finished], usage.add(index, event.completion_tokens))
        if body.include_usage:
            yield chunk([], usage_of(results, prompt_tokens))
        yield DONE

    return sse_response(events(), {})
