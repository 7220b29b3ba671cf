"""The engine's interface: what api/, ui/, serving/ and app.py call, wherever the model runs.

`EngineClient` is implemented by `inference.engine.Engine` (the model in this process) and by
`serving.remote_engine.RemoteEngine` (the model in Ray Serve replicas); callers hold an `EngineClient` and never import
the scheduler. Like vLLM's `EngineClient`, it lives apart from the engine so that reading the routes does not mean
reading the scheduler.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NamedTuple

from inference.admission import TokenizingGate
from inference.errors import GenerationError, InvalidRequestError, NotReadyError, PromptTooLongError
from inference.params import SamplingParams
from inference.prompts import ChatMessage, PreparedPrompt, PromptFormatter, check_messages
from inference.schemas import ModelInfo
from inference.settings import Settings
from inference.text import check_text

logger = logging.getLogger(__name__)


class EngineState(enum.Enum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"  # shutting down: running requests finish, new ones are refused
    STOPPED = "stopped"


# The likeliest tokens at one position and their log-probabilities, best first.
Alternatives = tuple[tuple[int, float], ...]


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model's own distribution, and the top alternatives where asked for."""

    logprob: float
    top: Alternatives = ()


@dataclass(frozen=True)
class TextChunk:
    """New text of a streaming request (already safe to show: no partial stop string, no broken character)."""

    text: str
    completion_tokens: int
    # the tokens generated since the previous chunk (the text may span several, or wait for a later one), and their
    # log-probabilities where the request asked for them (SamplingParams.logprobs)
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[Alternatives, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    finish_reason: str  # "length", "stop" or "eos"
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    time_to_first_token_seconds: float
    generation_seconds: float
    total_seconds: float
    # every generated token (an end-of-sequence token included), their log-probabilities where asked for, and the
    # seed the request sampled with (None when greedy): TGI's `details`
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    seed: int | None = None
    # with SamplingParams.top_logprobs: each generated token's alternatives; with prompt_logprobs: each prompt token's
    # log-probability given the tokens before it (None for the first, which has none) and its alternatives
    top_logprobs: tuple[Alternatives, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


class RequestHandleBase(abc.ABC):
    """A submitted request, wherever it runs: `events()` yields its text as it comes, then its result."""

    request_id: str

    @abc.abstractmethod
    def events(self) -> AsyncIterator[TextChunk | GenerationResult]: ...

    @abc.abstractmethod
    def cancel(self) -> None: ...

    async def result(self) -> GenerationResult:
        async for event in self.events():
            if isinstance(event, GenerationResult):
                return event
        raise GenerationError("The generation ended without a result.")  # pragma: no cover - events always end so


class EngineClient(abc.ABC):
    """What api/ and ui/ call, whether the model runs in this process (`Engine`) or in Ray Serve replicas
    (`serving.remote_engine.RemoteEngine`): readiness, the refusals decided before anything is queued, tokenizing,
    `stream`/`generate` over `submit`, and the observers told of every request's end."""

    settings: Settings
    state: EngineState
    failure: str | None
    formatter: PromptFormatter | None
    # Told of the end of every accepted request: (route, status, result or None).
    observers: list[Callable[[str, str, GenerationResult | None], None]]

    @abc.abstractmethod
    def start(self) -> None:
        """Blocking: load (or reach) the model; called once, from a start-up thread."""

    @abc.abstractmethod
    def drain(self) -> None:
        """Refuse new requests from now on; those already accepted keep running."""

    @abc.abstractmethod
    def shutdown(self, timeout_s: float = 5.0) -> None: ...

    @abc.abstractmethod
    def info(self) -> ModelInfo: ...

    @abc.abstractmethod
    def snapshot(self) -> dict[str, int]:
        """Live figures: requests running and waiting, and the current batch size."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int: ...

    @abc.abstractmethod
    def submit(
        self, prompt: PreparedPrompt, params: SamplingParams, *, request_id: str | None = None, route: str = "-"
    ) -> RequestHandleBase: ...

    @property
    def ready(self) -> bool:
        """Loaded and taking new requests (what /health and /health/ready report)."""
        return self.state is EngineState.READY

    @property
    def serving(self) -> bool:
        """Loaded and serving: ready, or draining (requests already accepted finish; info and tokenizing work)."""
        return self.state in (EngineState.READY, EngineState.DRAINING)

    def _serving_formatter(self) -> PromptFormatter:
        """The prompt formatter, while the engine serves (or drains: info and tokenizing still work then)."""
        if not self.serving or self.formatter is None:
            reason = self.failure or f"the model is {self.state.value}"
            raise NotReadyError(f"The model is not ready: {reason}.")
        return self.formatter

    @functools.cached_property
    def tokenizing_gate(self) -> TokenizingGate:
        """Bounds how many long prompts are tokenized at once (one gate per front end)."""
        return TokenizingGate(self.settings.max_concurrent_tokenizing)

    def prepare_completion(self, prompt: str, param: str = "prompt") -> PreparedPrompt:
        """Token ids of a plain prompt; refuses bad text, a prompt surely over MAX_INPUT_TOKENS (from its length,
        before tokenizing) and, past MAX_CONCURRENT_TOKENIZING long prompts at once, sheds load (429). Blocking."""
        formatter = self._serving_formatter()
        return formatter.prepare_completion(prompt, self.settings.max_input_tokens, param, self.tokenizing_gate)

    def prepare_chat(self, messages: list[ChatMessage]) -> PreparedPrompt:
        """Token ids of a conversation, with the same refusals as `prepare_completion`. Blocking."""
        formatter = self._serving_formatter()
        return formatter.prepare_chat(messages, self.settings.max_input_tokens, self.tokenizing_gate)

    async def tokenize_completion(self, prompt: str, param: str = "prompt") -> PreparedPrompt:
        """`prepare_completion` for an event loop: what is refused from its length alone is refused right here,
        the tokenizing itself runs in a worker thread."""
        formatter = self._serving_formatter()
        check_text(prompt, param)
        formatter.refuse_if_surely_too_long(prompt, self.settings.max_input_tokens, param)
        return await asyncio.to_thread(self.prepare_completion, prompt, param)

    async def tokenize_chat(self, messages: list[ChatMessage]) -> PreparedPrompt:
        """`prepare_chat` for an event loop (rendering the template and tokenizing run in a worker thread)."""
        self._serving_formatter()
        check_messages(messages)
        return await asyncio.to_thread(self.prepare_chat, messages)

    def token_pieces(self, token_ids: list[int]) -> list[str]:
        return self._serving_formatter().token_pieces(token_ids)

    def prepare_token_ids(self, token_ids: list[int], param: str = "prompt") -> PreparedPrompt:
        """A prompt given as token ids (as lm-evaluation-harness sends them): each must be in the vocabulary."""
        vocabulary = len(self._serving_formatter().tokenizer)
        outside = [token for token in token_ids if not 0 <= token < vocabulary]
        if outside:
            raise InvalidRequestError(
                f"`{param}` holds token ids outside this model's vocabulary (0 to {vocabulary - 1}): {outside[:5]}",
                param=param,
            )
        return PreparedPrompt(list(token_ids))

    def decode(self, token_ids: list[int]) -> str:
        """The text of token ids, special tokens as written (how `echo` shows a prompt given as ids)."""
        return str(self._serving_formatter().tokenizer.decode(token_ids, clean_up_tokenization_spaces=False))

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token decoded on its own (a piece of a character shows as U+FFFD; special tokens as written)."""
        tokenizer = self._serving_formatter().tokenizer
        return [str(tokenizer.decode([token_id], clean_up_tokenization_spaces=False)) for token_id in token_ids]

    def special_token_ids(self) -> set[int]:
        return set(self._serving_formatter().tokenizer.all_special_ids)

    def _refuse_early(self, prompt: PreparedPrompt, params: SamplingParams) -> None:
        """Raise, before anything is queued, for a request that can't be served: not ready, draining, too long."""
        self._serving_formatter()
        if self.state is EngineState.DRAINING:
            raise NotReadyError("The server is shutting down and takes no new requests.")
        check_lengths(self.settings, self.context_length, len(prompt.token_ids), params)

    async def stream(
        self, prompt: PreparedPrompt, params: SamplingParams, *, request_id: str | None = None, route: str = "-"
    ) -> AsyncIterator[TextChunk | GenerationResult]:
        """Yield text chunks as they are decoded, then the final result. Leaving the loop early cancels the request."""
        async for event in self.submit(prompt, params, request_id=request_id, route=route).events():
            yield event

    async def generate(
        self, prompt: PreparedPrompt, params: SamplingParams, *, request_id: str | None = None, route: str = "-"
    ) -> GenerationResult:
        """Run one request to the end and return its result."""
        return await self.submit(prompt, params, request_id=request_id, route=route).result()

    def report_end(self, route: str, status: str, result: GenerationResult | None) -> None:
        """Tell the observers (metrics) how a request ended."""
        for observer in self.observers:
            try:
                observer(route, status, result)
            except Exception:  # an observer's bug must not take the caller (the scheduler) down
                logger.exception("Request observer failed")


def check_lengths(
    settings: Settings,
    context_length: int,
    prompt_tokens: int,
    params: SamplingParams,
    length_name: str = "max_new_tokens",
) -> None:
    """Refuse, before queueing, a prompt that is empty or too long, or that can't fit with its max_new_tokens (which
    the refusal calls `length_name`, the caller's name for it)."""
    if prompt_tokens == 0:
        raise InvalidRequestError("`prompt` cannot be empty", param="prompt")
    if prompt_tokens > settings.max_input_tokens:
        raise PromptTooLongError(prompt_tokens, settings.max_input_tokens)
    total = prompt_tokens + params.max_new_tokens
    if total > context_length:
        raise InvalidRequestError(
            f"The prompt ({prompt_tokens} tokens) plus {length_name} ({params.max_new_tokens}) is {total} tokens, "
            f"more than the model's context length of {context_length}. Lower {length_name} or shorten "
            "the prompt.",
            param=length_name,
        )
    if total > settings.max_batch_tokens:
        raise InvalidRequestError(
            f"The prompt ({prompt_tokens} tokens) plus {length_name} ({params.max_new_tokens}) is {total} tokens, "
            f"more than this server's batch token budget of {settings.max_batch_tokens} (MAX_BATCH_TOKENS).",
            param=length_name,
        )
