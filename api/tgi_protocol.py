"""Request and response shapes of Text Generation Inference's API (`POST /`, `/generate` with `inputs`,
`/generate_stream`, `GET /info`), so `huggingface_hub.InferenceClient(base_url=...).text_generation` and other TGI
clients work unchanged. Field names, defaults and meanings follow TGI's OpenAPI schema; parameters whose effect this
server can't honour are refused with one 422 that names them all.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.protocol import MAX_PROMPT_CHARS
from inference.errors import InvalidRequestError
from inference.grammar import json_schema_grammar, regex_grammar, schema_of
from inference.params import (
    AdditivePenalty,
    MaxNewTokens,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    build_sampling_params,
)
from inference.settings import Settings
from inference.text import Text

TGI_FINISH_REASONS = {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TGIParameters(BaseModel):
    """TGI's `GenerateParameters`."""

    model_config = STRICT

    do_sample: bool = Field(default=False, description="Sample; without it (and without warpers) decoding is greedy.")
    max_new_tokens: MaxNewTokens | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: AdditivePenalty | None = None
    seed: Seed | None = None
    stop: list[Text] = Field(default_factory=list)
    details: bool = Field(default=False, description="Answer with tokens, log-probabilities and finish reason.")
    return_full_text: bool | None = Field(default=None, description="Put the prompt before the generated text.")
    truncate: int | None = Field(default=None, ge=1, description="Keep only the prompt's last this many tokens.")
    # TGI features this server doesn't have: accepted at their "off" value, refused otherwise
    best_of: int | None = None
    decoder_input_details: bool = False
    top_n_tokens: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None

    @model_validator(mode="after")
    def _check_supported(self) -> TGIParameters:
        """One 422 naming every parameter whose effect this server can't honour."""
        refused = [
            name
            for name, off in (
                ("best_of", self.best_of in (None, 1)),
                ("decoder_input_details", not self.decoder_input_details),
                ("top_n_tokens", not self.top_n_tokens),
                ("typical_p", self.typical_p in (None, 1.0)),
                ("watermark", not self.watermark),
                ("adapter_id", not self.adapter_id),
            )
            if not off
        ]
        if refused:
            names = ", ".join(f"`{name}`" for name in refused)
            raise InvalidRequestError(f"not supported by this server: {names}", param=",".join(refused))
        _ = self.compiled_grammar  # a grammar that can't be used is refused now
        return self

    @functools.cached_property
    def compiled_grammar(self) -> str | None:
        """TGI's `grammar`: `{"type": "json", "value": <schema>}` or `{"type": "regex", "value": <pattern>}`."""
        if self.grammar is None:
            return None
        kind, value = self.grammar.get("type"), self.grammar.get("value")
        if kind in ("json", "json_object"):
            return json_schema_grammar(schema_of(value, "grammar.value"), "grammar.value")
        if kind == "regex" and isinstance(value, str):
            return regex_grammar(value, "grammar.value")
        raise InvalidRequestError(
            '`grammar` must be {"type": "json", "value": <JSON schema>} or {"type": "regex", "value": <pattern>}',
            param="grammar",
        )

    @property
    def samples(self) -> bool:
        """TGI samples when asked to, or when any warper is set to something other than "off"."""
        warpers = self.temperature not in (None, 1.0) or self.top_k not in (None, 0) or self.top_p not in (None, 1.0)
        return self.do_sample or warpers

    def sampling_params(self, settings: Settings, streamed: bool) -> SamplingParams:
        """The engine's parameters; tokens' log-probabilities only where the answer shows them (`details`, or every
        streamed token event), since they cost a log-softmax over the vocabulary per row and step."""
        knobs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "stop": self.stop or None,
        }
        if self.samples:  # TGI's defaults: no truncation of the distribution unless asked for
            temperature = 1.0 if self.temperature is None else self.temperature
            knobs |= {"temperature": temperature, "top_k": self.top_k or 0, "top_p": self.top_p or 1.0}
        else:
            knobs["temperature"] = 0.0
        params = build_sampling_params(settings, **knobs)
        return replace(params, logprobs=self.details or streamed, grammar=self.compiled_grammar)


class TGIRequest(BaseModel):
    """TGI's `GenerateRequest` (`/generate`, `/generate_stream`) and `CompatGenerateRequest` (`POST /`)."""

    model_config = STRICT

    inputs: Text = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Text to continue; not empty.")
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = Field(default=False, description="Answer with TGI's token events (as `/generate_stream`).")


class TGIToken(BaseModel):
    id: int
    text: str = Field(description="The text this token adds to the answer (empty while a character is incomplete).")
    logprob: float | None = Field(description="Under the model's own distribution, before sampling's changes.")
    special: bool


class TGIDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[TGIToken] = Field(default_factory=list, description="Empty: prompt details are not supported.")
    tokens: list[TGIToken]


class TGIResponse(BaseModel):
    generated_text: str
    details: TGIDetails | None = None


class TGIStreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    input_length: int


class TGIStreamEvent(BaseModel):
    index: int
    token: TGIToken
    top_tokens: None = None
    generated_text: str | None = None
    details: TGIStreamDetails | None = None


class TGIInfo(BaseModel):
    """TGI's `/info`: what is served and the limits that apply."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_size: int
    max_client_batch_size: int = 1
    validation_workers: int
    router: str = "llm-serving"
    version: str
    sha: str | None = None
    docker_label: str | None = None
