"""The engine's own error types. The HTTP edge maps each to a status code in one table (api/errors.py)."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose; `message` is safe to show to a client."""

    type = "server_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # True once the engine has written the request's log line, so the HTTP edge does not log it twice.
        self.logged = False


class InvalidRequestError(EngineError):
    """A parameter is missing, of the wrong type or out of range."""

    type = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    """The prompt has more tokens than the server accepts; says both numbers, never truncates."""

    def __init__(self, prompt_tokens: int, limit: int, param: str = "prompt", *, at_least: bool = False) -> None:
        # `at_least`: counted from its length in characters, before tokenizing (refused cheaply, as it must be)
        count = f"at least {prompt_tokens} tokens (from its length alone)" if at_least else f"{prompt_tokens} tokens"
        super().__init__(
            f"The prompt has {count}, more than the limit of {limit} tokens (MAX_INPUT_TOKENS). Shorten the prompt.",
            param=param,
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class UnknownModelError(InvalidRequestError):
    """A request named a model this server does not serve (OpenAI routes answer 404, as OpenAI does)."""

    def __init__(self, asked: str, served: str) -> None:
        super().__init__(f"The model `{asked}` does not exist on this server; it serves `{served}`.", param="model")


class QueueFullError(EngineError):
    """Too many requests are waiting; the client should retry after `retry_after_s`."""

    type = "overloaded_error"

    def __init__(self, queue_size: int, retry_after_s: int = 1) -> None:
        super().__init__(f"The server is busy: {queue_size} requests are already waiting. Retry shortly.")
        self.retry_after_s = retry_after_s


class TokenizerBusyError(QueueFullError):
    """Too many long prompts are being tokenized at once (MAX_CONCURRENT_TOKENIZING); retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int = 1) -> None:
        EngineError.__init__(
            self, "The server is busy tokenizing other long prompts (MAX_CONCURRENT_TOKENIZING). Retry shortly."
        )
        self.retry_after_s = retry_after_s


class RequestTimeoutError(EngineError):
    """The request did not finish within REQUEST_TIMEOUT_S (waiting included); its generation was stopped."""

    type = "timeout_error"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"The request did not finish within {timeout_s:g} seconds (REQUEST_TIMEOUT_S).")


class NotReadyError(EngineError):
    """The model is still loading, failed to load, or the engine is shutting down."""

    type = "unavailable_error"


class GenerationError(EngineError):
    """Generation failed inside the model for this request (a bug or a fault, not the client's doing)."""

    type = "server_error"


class ModelNotFoundError(EngineError):
    """MODEL_ID could not be resolved to any loadable model; the message names what was tried and how to fix it."""

    type = "model_not_found"
