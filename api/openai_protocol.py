"""Request and response shapes of the OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions).

Parameters OpenAI defines but this server can't honour are refused with a clear 422, never silently ignored.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.protocol import MAX_PROMPT_CHARS
from inference.errors import InvalidRequestError
from inference.grammar import json_schema_grammar, schema_of
from inference.params import MAX_SEED, MaxNewTokens, SamplingParams, TokenChoiceKnobs, build_sampling_params
from inference.prompts import ChatMessage
from inference.settings import Settings
from inference.text import Text

OPENAI_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
# Most alternatives per token `logprobs` may ask for (OpenAI allows 5, vLLM 20).
MAX_LOGPROBS = 20


# strict: "10", true or "yes" where a number or a boolean belongs is a 422, never coerced (as in /generate), and so is
# NaN (which Python's JSON reader accepts); the official clients send JSON numbers and booleans, so they are unaffected.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False
    # vLLM's extension: usage so far in every chunk (load-testing tools count tokens with it)
    continuous_usage_stats: bool = False


# OpenAI's names for knobs that have another name here: errors speak the client's language.
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}
# Where a client leaves a knob out, OpenAI's documented defaults apply here, not the server's (an explicit null gets
# the server's); `top_k` and `repetition_penalty` are extras beyond OpenAI's set, off unless asked for.
OPENAI_DEFAULTS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


class SamplingFields(TokenChoiceKnobs):
    """What both OpenAI routes share: the knobs of how tokens are picked (inference/params.py), and OpenAI's own."""

    model_config = STRICT

    model: Text
    n: int = Field(default=1, ge=1, description="Choices to generate; at most MAX_N.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # OpenAI fields that change nothing about the text: accepted so that clients sending them work, and not used
    user: Text | None = Field(default=None, description="Accepted for compatibility; not used.")
    store: bool | None = Field(default=None, description="Accepted for compatibility; nothing is stored.")
    metadata: dict[str, Text] | None = Field(default=None, description="Accepted for compatibility; not used.")
    service_tier: Text | None = Field(default=None, description="Accepted for compatibility; not used.")
    response_format: dict[str, Any] | None = Field(
        default=None,
        description='`{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"schema": ...}}`: '
        "decoding follows the schema, so the answer is valid JSON every time (unless cut by max_tokens).",
    )
    # vLLM's extensions, which benchmark tools send to pin the answer's length
    ignore_eos: bool = Field(default=False, description="Keep generating past the end-of-sequence token.")
    min_tokens: int = Field(default=0, ge=0, description="No end-of-sequence token before this many tokens.")

    @model_validator(mode="before")
    @classmethod
    def _openai_defaults(cls, data: Any) -> Any:
        return {**OPENAI_DEFAULTS, **data} if isinstance(data, dict) else data

    def _refuse(self) -> list[tuple[str, str]]:
        """(parameter, why) for each value set that this server does not support."""
        refused = []
        if self.logit_bias:
            refused.append(("logit_bias", "`logit_bias` is not supported"))
        if self.response_format and self.response_format.get("type") not in ("text", "json_object", "json_schema"):
            refused.append(
                ("response_format", '`response_format` must be of type "text", "json_object" or "json_schema"')
            )
        return refused

    @functools.cached_property
    def grammar(self) -> str | None:
        """The grammar `response_format` asks decoding to follow (None for plain text); a bad schema is a 422."""
        kind = (self.response_format or {}).get("type")
        if kind == "json_object":
            return json_schema_grammar({"type": "object"}, "response_format")
        if kind == "json_schema":
            spec = (self.response_format or {}).get("json_schema")
            if not isinstance(spec, dict):
                raise InvalidRequestError(
                    '`response_format.json_schema` must be an object holding the schema as `"schema"`',
                    param="response_format.json_schema",
                )
            schema = schema_of(spec.get("schema", {"type": "object"}), "response_format.json_schema.schema")
            return json_schema_grammar(schema, "response_format.json_schema.schema")
        return None

    @model_validator(mode="after")
    def _check_supported(self) -> SamplingFields:
        """One 422 naming every parameter of the request whose effect this server can't honour."""
        refused = self._refuse()
        if refused:
            raise InvalidRequestError("; ".join(why for _, why in refused), param=",".join(p for p, _ in refused))
        _ = self.grammar  # a schema that can't be used is refused now, before any tokenizing
        return self

    def check_size(self, settings: Settings, prompts: int) -> None:
        """Refuse, before any tokenizing, a request for more than the server takes: over MAX_PROMPTS prompts, over
        MAX_N choices, or more generations (n x prompts) than MAX_QUEUE_SIZE, which could never be queued at once
        (so 422, not a 429 that a client would retry forever)."""
        if prompts > settings.max_prompts:
            raise InvalidRequestError(
                f"`prompt` may hold at most {settings.max_prompts} prompts (MAX_PROMPTS), got {prompts}", param="prompt"
            )
        if self.n > settings.max_n:
            raise InvalidRequestError(f"`n` must be at most {settings.max_n} (MAX_N), got {self.n}", param="n")
        if self.n * prompts > settings.max_queue_size:
            raise InvalidRequestError(
                f"This request asks for {self.n * prompts} generations (`n` = {self.n} for each of {prompts} "
                f"prompts), more than this server can ever queue at once ({settings.max_queue_size}, "
                "MAX_QUEUE_SIZE). Split it into smaller requests.",
                param="n",
            )

    def sampling_params(self, settings: Settings, max_tokens: int | None, choice: int) -> SamplingParams:
        knobs = self.knobs()
        if self.seed is not None:  # choices of one request differ, yet the whole request stays reproducible
            knobs["seed"] = (self.seed + choice) % (MAX_SEED + 1)
        params = build_sampling_params(settings, names=OPENAI_NAMES, max_new_tokens=max_tokens, **knobs)
        if self.min_tokens > params.max_new_tokens:
            raise InvalidRequestError(
                f"`min_tokens` ({self.min_tokens}) must be at most `max_tokens` ({params.max_new_tokens})",
                param="min_tokens",
            )
        return replace(params, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, grammar=self.grammar)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    def chunk_json(self, chunk: BaseModel) -> str:
        """A streamed chunk as OpenAI sends it: `finish_reason` and `logprobs` null until set, and `usage` null on
        every chunk but the last when usage is asked for (absent otherwise)."""
        return chunk.model_dump_json(exclude=None if self.include_usage or self.continuous_usage else {"usage"})


TokenId = Annotated[int, Field(ge=0)]


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        description="A prompt, or a list of prompts (one set of choices each; at most MAX_PROMPTS); a prompt may be "
        "text or a list of token ids."
    )
    max_tokens: MaxNewTokens | None = Field(default=16, description="OpenAI's default is 16.")
    echo: bool = Field(default=False, description="Put the prompt before the completion (and its logprobs).")
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="Each token's log-probability and this many alternatives."
    )
    best_of: int | None = None
    suffix: str | None = None

    def _refuse(self) -> list[tuple[str, str]]:
        refused = super()._refuse()
        if self.logprobs is not None and self.stream and self.echo:
            refused.append(("echo", "`echo` with `logprobs` is not supported with `stream`"))
        if self.best_of not in (None, 1):
            refused.append(("best_of", "`best_of` other than 1 is not supported"))
        if self.suffix:
            refused.append(("suffix", "`suffix` is not supported"))
        return refused

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids (a list of ints is one prompt of ids, as in OpenAI's API)."""
        given: list[Any] = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if given and all(isinstance(token, int) for token in given):
            given = [given]
        prompts: list[str | list[int]] = given
        if not prompts or any(not p or (isinstance(p, str) and len(p) > MAX_PROMPT_CHARS) for p in prompts):
            raise InvalidRequestError(
                "`prompt` must be a non-empty string, a non-empty list of token ids, or a list of either",
                param="prompt",
            )
        return prompts

    def sampling_params(self, settings: Settings, max_tokens: int | None, choice: int) -> SamplingParams:
        params = super().sampling_params(settings, max_tokens, choice)
        if self.logprobs is None:
            return params
        prompt_logprobs = self.logprobs if self.echo else None
        return replace(params, logprobs=True, top_logprobs=self.logprobs, prompt_logprobs=prompt_logprobs)


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: Text


class ChatMessageIn(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] = Field(description="Text, or a list of text parts (no images).")
    name: Text | None = None

    def as_message(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        # `developer` is OpenAI's newer name for the system role
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: MaxNewTokens | None = None
    max_completion_tokens: MaxNewTokens | None = Field(default=None, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = Field(default=None, description="Each generated token's log-probability.")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="With `logprobs`, this many alternatives per token."
    )
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def _refuse(self) -> list[tuple[str, str]]:
        refused = super()._refuse()
        if self.top_logprobs and not self.logprobs:
            refused.append(("top_logprobs", "`top_logprobs` needs `logprobs`: true"))
        if self.tools or self.tool_choice not in (None, "none"):
            refused.append(("tools", "tools and function calling are not supported"))
        return refused

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, settings: Settings, max_tokens: int | None, choice: int) -> SamplingParams:
        params = super().sampling_params(settings, max_tokens, choice)
        if not self.logprobs:
            return params
        return replace(params, logprobs=True, top_logprobs=self.top_logprobs or 0)

    @property
    def chat_messages(self) -> list[ChatMessage]:
        return [message.as_message() for message in self.messages]


# ----- responses ---------------------------------------------------------------------------------------------------


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object: per token its text, log-probability, likeliest alternatives and where its
    text starts in the choice's text. With `echo`, the prompt's tokens come first (the first has no log-probability)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


class Delta(BaseModel):
    """What a chunk adds: OpenAI leaves out what it doesn't add (the role after the first chunk)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=lambda value: value is None)
    content: str | None = Field(default=None, exclude_if=lambda value: value is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: OpenAIUsage | None = None
