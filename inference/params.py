"""Generation parameters: the nine sampling knobs, each declared once with its bounds, and the value object every
entry point builds through one validation path (`build_sampling_params`) and the engine trusts (`SamplingParams`).

The request models (api/protocol.py, api/openai_protocol.py) type their fields with the `Annotated` knob types below
(their bounds show in the OpenAPI spec), the playground's sliders take their ranges from `knob_range`, and a value
refused here is named as the caller named it (`max_tokens` on the OpenAI routes, `max_length` in the playground).

Defaults: one set, the DEFAULT_* constants below; the DEFAULT_* settings override them, and wherever a request leaves
a knob out, the settings' value applies. `SamplingParams()` holds the same values, so code that builds one directly
(benchmarks, tests) samples as a request with no parameters does. Only the OpenAI routes differ where a client leaves
a knob out: they keep OpenAI's documented defaults (api/openai_protocol.py).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, cast

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference.errors import InvalidRequestError
from inference.text import Text, text_problem

if TYPE_CHECKING:
    from inference.settings import Settings

# Upper bounds that no sensible request exceeds; they keep huge numbers from reaching torch.
MAX_TEMPERATURE = 2.0
MIN_SAMPLING_TEMPERATURE = 1e-4
MAX_TOP_K = 1000
MAX_REPETITION_PENALTY = 10.0
MAX_SEED = 2**63 - 1
# OpenAI's range for presence_penalty and frequency_penalty.
MAX_ADDITIVE_PENALTY = 2.0

# The server's defaults (the settings DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_TOP_K, DEFAULT_MAX_NEW_TOKENS
# override them); the other knobs default to "off".
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 50

# The knobs: a type each, with its bounds. MAX_NEW_TOKENS (a setting) caps max_new_tokens at request time.
MaxNewTokens = Annotated[int, Field(ge=1, description="Most tokens to generate; capped by MAX_NEW_TOKENS.")]
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, description="0 means greedy.")]
TopP = Annotated[float, Field(gt=0, le=1, description="Nucleus sampling mass; 1 turns it off.")]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K, description="0 turns top-k off.")]
RepetitionPenalty = Annotated[float, Field(gt=0, le=MAX_REPETITION_PENALTY, description="1 turns it off.")]
AdditivePenalty = Annotated[float, Field(ge=-MAX_ADDITIVE_PENALTY, le=MAX_ADDITIVE_PENALTY)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="Same seed and parameters, same text.")]
Stop = Annotated[Text | list[Text], Field(description="Output ends before the first of these strings.")]


class TokenChoiceKnobs(BaseModel):
    """The knobs of how each token is picked, as a caller gives them; None (or left out) means the server's default.
    The OpenAI request models inherit them (they name the length knob their own way); see `SamplingKnobs`."""

    # strict: "10", true or "yes" where a number belongs is refused, never coerced; so are NaN and infinities
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: AdditivePenalty | None = None
    frequency_penalty: AdditivePenalty | None = None
    seed: Seed | None = None
    stop: Stop | None = None

    def knobs(self) -> dict[str, Any]:
        """The knobs' values by name, for `build_sampling_params`."""
        return {name: getattr(self, name) for name in KNOBS if name in type(self).model_fields}


class SamplingKnobs(TokenChoiceKnobs):
    """All nine knobs under their own names: what `build_sampling_params` validates, and what the REST
    GenerateRequest inherits."""

    max_new_tokens: MaxNewTokens | None = None


def _knob_type(knob: str) -> Any:
    """A knob's `Annotated` type, out of `SamplingKnobs`' `X | None`."""
    hint = typing.get_type_hints(SamplingKnobs, include_extras=True)[knob]
    return next(arg for arg in typing.get_args(hint) if arg is not type(None))


def _knob_field(knob: str) -> Any:
    """The FieldInfo that holds a knob's bounds."""
    return typing.get_args(_knob_type(knob))[1]


KNOBS = tuple(SamplingKnobs.model_fields)
_INTEGER_KNOBS = frozenset(knob for knob in KNOBS if typing.get_args(_knob_type(knob))[0] is int)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. `temperature == 0` means greedy; `top_k == 0` and `top_p == 1` mean "off"."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    # Report each generated token's log-probability (TGI's `details`, OpenAI's `logprobs`), with its `top_logprobs`
    # likeliest alternatives; and with `prompt_logprobs` (a count of alternatives), each prompt token's (OpenAI's
    # `echo`). Not knobs: they change no token.
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    # Load-testing extensions (vLLM's): keep generating past an end-of-sequence token; forbid it before this many.
    ignore_eos: bool = False
    min_tokens: int = 0
    # An llguidance grammar (inference/grammar.py) every token must follow: JSON output, a TGI regex.
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        # below this, sampling is greedy anyway, and dividing by it would overflow in float32
        return self.temperature < MIN_SAMPLING_TEMPERATURE


def knob_range(knob: str) -> tuple[float, float]:
    """The lowest and highest value a numeric knob takes, as declared (an exclusive bound as the bound itself; ints
    stay ints, so MAX_SEED keeps every digit)."""
    low, high = -math.inf, math.inf
    for constraint in _knob_field(knob).metadata:
        bound: Any = getattr(constraint, "ge", getattr(constraint, "gt", None))
        if bound is not None:
            low = bound
        elif isinstance(constraint, annotated_types.Le):
            high = cast(float, constraint.le)
    return low, high


def build_sampling_params(
    settings: Settings, *, names: Mapping[str, str] | None = None, **values: Any
) -> SamplingParams:
    """Check every knob in `values` (keyed by knob name; None or absent: the default) against its bounds and the
    server's limits, and fill the defaults from the settings. A refusal is an InvalidRequestError naming the knob as
    the caller does: `names` maps knob names to the caller's own (`{"max_new_tokens": "max_tokens"}`)."""
    names = names or {}
    unknown = set(values) - set(KNOBS)
    if unknown:
        raise TypeError(f"not sampling knobs: {sorted(unknown)}")
    values = {knob: _loosened(knob, value) for knob, value in values.items()}
    try:
        given = SamplingKnobs.model_validate(values)
    except ValidationError as error:
        knob = str(error.errors()[0]["loc"][0])
        name = names.get(knob, knob)
        raise InvalidRequestError(_why(knob, name, values[knob], settings), param=name) from None
    max_new_tokens = given.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(settings.default_max_new_tokens, settings.max_new_tokens)
    elif max_new_tokens > settings.max_new_tokens:
        name = names.get("max_new_tokens", "max_new_tokens")
        raise InvalidRequestError(_why("max_new_tokens", name, max_new_tokens, settings), param=name)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=_default(given.temperature, settings.default_temperature),
        top_p=_default(given.top_p, settings.default_top_p),
        top_k=settings.default_top_k if given.top_k is None else given.top_k,
        repetition_penalty=_default(given.repetition_penalty, 1.0),
        presence_penalty=_default(given.presence_penalty, 0.0),
        frequency_penalty=_default(given.frequency_penalty, 0.0),
        seed=given.seed,
        stop=_stop_strings(settings, given.stop, names.get("stop", "stop")),
    )


def _loosened(knob: str, value: Any) -> Any:
    """What strict validation would refuse only for its form: an integral float for an integer knob (sliders send
    12.0 for 12) and a tuple of stop strings."""
    if knob in _INTEGER_KNOBS and isinstance(value, float) and value.is_integer():
        return int(value)
    if knob == "stop" and isinstance(value, tuple):
        return list(value)
    return value


def _default(value: float | None, default: float) -> float:
    return float(default if value is None else value)


def _why(knob: str, name: str, value: object, settings: Settings) -> str:
    """Why a knob's value is refused, in words, under the caller's name for it."""
    if knob == "stop":
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        # a string that is not text says so; anything else is the wrong shape
        problems = [text_problem(text) for text in texts if isinstance(text, str) and text_problem(text)]
        return f"`{name}` {problems[0] if problems else 'must be a string or a list of strings'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"`{name}` must be a number"
    if knob in _INTEGER_KNOBS and isinstance(value, float):
        return f"`{name}` must be an integer"
    low, high = knob_range(knob)
    if knob == "max_new_tokens":
        high = settings.max_new_tokens
    if any(isinstance(constraint, annotated_types.Gt) for constraint in _knob_field(knob).metadata):
        return f"`{name}` must be > {low:g} and <= {high:g}, got {value!r}"
    return f"`{name}` must be between {low:g} and {high:g}, got {value!r}"


def _stop_strings(settings: Settings, stop: str | list[str] | None, name: str) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > settings.max_stop_sequences:
        raise InvalidRequestError(
            f"`{name}` may hold at most {settings.max_stop_sequences} strings, got {len(stops)}", param=name
        )
    for item in stops:
        if not item:
            raise InvalidRequestError(f"each `{name}` string must be a non-empty string", param=name)
        if len(item) > settings.max_stop_length:
            raise InvalidRequestError(
                f"each `{name}` string may be at most {settings.max_stop_length} characters", param=name
            )
    return tuple(dict.fromkeys(stops))
