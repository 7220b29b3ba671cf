"""Generation parameters: one validated value object that every entry point builds and the engine trusts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from inference.errors import InvalidRequestError
from inference.settings import Settings
from inference.text import check_text

# Upper bounds that no sensible request exceeds; they keep huge numbers from reaching torch.
MAX_TEMPERATURE = 2.0
MIN_SAMPLING_TEMPERATURE = 1e-4
MAX_TOP_K = 1000
MAX_REPETITION_PENALTY = 10.0
MAX_SEED = 2**63 - 1
# OpenAI's range for presence_penalty and frequency_penalty.
MAX_ADDITIVE_PENALTY = 2.0


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. `temperature == 0` means greedy; `top_k == 0` and `top_p == 1` mean "off"."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        # below this, sampling is greedy anyway, and dividing by it would overflow in float32
        return self.temperature < MIN_SAMPLING_TEMPERATURE


def _number(name: str, value: object, low: float, high: float, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"`{name}` must be a number", param=name)
    # ints are compared exactly: float(int) overflows for huge ones (JSON allows them)
    if integer and isinstance(value, float) and not value.is_integer():
        raise InvalidRequestError(f"`{name}` must be an integer", param=name)
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise InvalidRequestError(f"`{name}` must be between {low:g} and {high:g}, got {value!r}", param=name)
    return value


def build_sampling_params(
    settings: Settings,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | tuple[str, ...] | None = None,
) -> SamplingParams:
    """Check every value against the server's limits (InvalidRequestError names the parameter) and fill defaults."""
    if max_new_tokens is None:
        max_new_tokens = min(settings.default_max_new_tokens, settings.max_new_tokens)
    _number("max_new_tokens", max_new_tokens, 1, settings.max_new_tokens, integer=True)
    temperature = settings.default_temperature if temperature is None else temperature
    _number("temperature", temperature, 0.0, MAX_TEMPERATURE)
    top_p = settings.default_top_p if top_p is None else top_p
    _number("top_p", top_p, 0.0, 1.0)
    if top_p == 0:
        raise InvalidRequestError("`top_p` must be > 0.0 and <= 1.0", param="top_p")
    top_k = settings.default_top_k if top_k is None else top_k
    _number("top_k", top_k, 0, MAX_TOP_K, integer=True)
    repetition_penalty = 1.0 if repetition_penalty is None else repetition_penalty
    _number("repetition_penalty", repetition_penalty, 0.0, MAX_REPETITION_PENALTY)
    if repetition_penalty == 0:
        raise InvalidRequestError("`repetition_penalty` must be strictly positive", param="repetition_penalty")
    presence_penalty = 0.0 if presence_penalty is None else presence_penalty
    _number("presence_penalty", presence_penalty, -MAX_ADDITIVE_PENALTY, MAX_ADDITIVE_PENALTY)
    frequency_penalty = 0.0 if frequency_penalty is None else frequency_penalty
    _number("frequency_penalty", frequency_penalty, -MAX_ADDITIVE_PENALTY, MAX_ADDITIVE_PENALTY)
    if seed is not None:
        _number("seed", seed, 0, MAX_SEED, integer=True)
    stops = _stop_strings(settings, stop)
    return SamplingParams(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        repetition_penalty=float(repetition_penalty),
        presence_penalty=float(presence_penalty),
        frequency_penalty=float(frequency_penalty),
        seed=None if seed is None else int(seed),
        stop=stops,
    )


def _stop_strings(settings: Settings, stop: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if not isinstance(stop, (str, list, tuple)):
        raise InvalidRequestError("`stop` must be a string or a list of strings", param="stop")
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > settings.max_stop_sequences:
        raise InvalidRequestError(
            f"`stop` may hold at most {settings.max_stop_sequences} strings, got {len(stops)}", param="stop"
        )
    for item in stops:
        if not isinstance(item, str) or not item:
            raise InvalidRequestError("each `stop` string must be a non-empty string", param="stop")
        check_text(item, "stop")
        if len(item) > settings.max_stop_length:
            raise InvalidRequestError(
                f"each `stop` string may be at most {settings.max_stop_length} characters", param="stop"
            )
    return tuple(dict.fromkeys(stops))
