"""What crosses between the ingress and the engine replicas, beyond the engine's own picklable events.

TextChunk, GenerationResult, PreparedPrompt, SamplingParams and ModelInfo pickle as they are. EngineError subclasses
don't survive a plain pickle round trip: `Exception.__reduce__` rebuilds them as `cls(*args)`, and several take other
arguments than their message (PromptTooLongError, QueueFullError, RequestTimeoutError, UnknownModelError), so the
copy fails or garbles its message. The replica sends a `WireError` instead, and the ingress rebuilds the same class
with the same message, param and extra fields, so the HTTP edge maps it to the same status code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inference import errors
from inference.errors import EngineError


@dataclass(frozen=True)
class WireError:
    """An EngineError as plain data. `refused`: raised when the request was submitted (never accepted)."""

    class_name: str
    message: str
    param: str | None
    logged: bool
    refused: bool
    extra: dict[str, Any] = field(default_factory=dict)


def _error_classes() -> dict[str, type[EngineError]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, EngineError)
    }


def pack_error(error: EngineError, *, refused: bool = False) -> WireError:
    known = {"message", "param", "logged"}
    extra = {key: value for key, value in vars(error).items() if key not in known and not key.startswith("_")}
    name = type(error).__name__ if type(error).__name__ in _error_classes() else "GenerationError"
    return WireError(name, error.message, error.param, error.logged, refused, extra)


def unpack_error(wire: WireError) -> EngineError:
    """The same class, message, param and fields (retry_after_s, prompt_tokens...), without calling its __init__."""
    cls = _error_classes().get(wire.class_name, errors.GenerationError)
    error = cls.__new__(cls)
    EngineError.__init__(error, wire.message, wire.param)
    error.logged = wire.logged
    for key, value in wire.extra.items():
        setattr(error, key, value)
    return error
