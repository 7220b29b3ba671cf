"""Request and response shapes of the REST routes (api/routes.py, api/health.py) and the JSON error body of every
route (api/errors.py): the wire format, apart from what the engine itself returns (inference/schemas.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from inference.errors import InvalidRequestError
from inference.grammar import json_schema_grammar
from inference.params import MaxNewTokens, SamplingKnobs, SamplingParams, build_sampling_params
from inference.settings import Settings
from inference.text import Text

# The body size cap (MAX_BODY_BYTES) bounds the prompt's length; this bounds a single field in characters.
MAX_PROMPT_CHARS = 1_000_000


class GenerateRequest(SamplingKnobs):
    model_config = ConfigDict(populate_by_name=True)

    prompt: Text = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Text to continue; not empty.")
    max_new_tokens: MaxNewTokens | None = Field(
        default=None,
        validation_alias=AliasChoices("max_new_tokens", "max_length"),
        description="Most tokens to generate (also accepted as `max_length`, the playground's name); capped by "
        "MAX_NEW_TOKENS.",
    )
    stream: bool = Field(default=False, description="Answer with server-sent events as the text is generated.")
    json_schema: dict[str, Any] | None = Field(
        default=None, description="Decoding follows this JSON schema, so the text is valid JSON every time."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_name_at_a_time(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_new_tokens" in data and "max_length" in data:
            raise InvalidRequestError(
                "give `max_new_tokens` or `max_length` (two names for the same parameter), not both", param="max_length"
            )
        return data

    def sampling_params(self, settings: Settings) -> SamplingParams:
        params = build_sampling_params(settings, **self.knobs())
        if self.json_schema is None:
            return params
        return replace(params, grammar=json_schema_grammar(self.json_schema, "json_schema"))


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queue_s: float = Field(description="Waiting for a slot in the running batch.")
    time_to_first_token_s: float
    generation_s: float = Field(description="From joining the batch to the last token.")
    total_s: float
    tokens_per_s: float


class GenerateResponse(BaseModel):
    id: str
    model: str
    generated_text: str
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage
    timings: Timings


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


HealthStatus = Literal["ok", "loading", "failed", "starting", "draining", "stopped"]


class HealthResponse(BaseModel):
    status: HealthStatus
    model_id: str
    reason: str | None = None


class StreamText(BaseModel):
    """A server-sent event of a streaming /generate: new text, safe to show."""

    type: Literal["text"] = "text"
    text: str
    completion_tokens: int


class StreamDone(GenerateResponse):
    """The last server-sent event of a streaming /generate: the whole text, finish reason, usage and timings."""

    type: Literal["done"] = "done"


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=MAX_PROMPT_CHARS)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Text | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="Plain text, as /generate sees it."
    )
    messages: list[Message] | None = Field(
        default=None, min_length=1, description="A conversation, as /v1/chat/completions sees it (chat template)."
    )


class TokenizeResponse(BaseModel):
    count: int
    tokens: list[int]
    pieces: list[str]
    max_input_tokens: int
    fits: bool = Field(description="Whether the prompt is within MAX_INPUT_TOKENS.")
