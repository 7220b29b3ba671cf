"""The engine: owns the model and tokenizer, and a scheduler thread that batches every request continuously.

Requests join the running batch after their prefill and leave it the step they finish, so a short request is not
held behind a long one. Callers (HTTP routes, Gradio events, benchmarks) use `stream`/`generate` from any asyncio
loop; the engine knows nothing of HTTP or Gradio.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import dataclasses
import enum
import functools
import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from inference import __version__
from inference import batch as batching
from inference.admission import TokenizingGate
from inference.detokenize import IncrementalDecoder, StopStringFilter
from inference.errors import (
    EngineError,
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    PromptTooLongError,
    QueueFullError,
    RequestTimeoutError,
)
from inference.loader import LoadedModel, load_model
from inference.memory import release_free_heap_pages, return_freed_memory_promptly
from inference.params import SamplingParams
from inference.prompts import ChatMessage, PreparedPrompt, PromptFormatter, check_messages
from inference.sampling import RowSampler, sample_next_tokens
from inference.schemas import ModelInfo, ServerLimits, WeightsInfo
from inference.settings import Settings
from inference.text import check_text

logger = logging.getLogger("inference.engine")


class EngineState(enum.Enum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"  # shutting down: running requests finish, new ones are refused
    STOPPED = "stopped"


@dataclass(frozen=True)
class TextChunk:
    """New text of a streaming request (already safe to show: no partial stop string, no broken character)."""

    text: str
    completion_tokens: int


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

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


_Event = TextChunk | GenerationResult | EngineError


@dataclass(eq=False)
class _Sequence:
    """One request's state inside the engine."""

    request_id: str
    route: str
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[_Event], None]
    submitted_at: float
    deadline: float
    cancelled: bool = False  # the caller left (Stop, disconnect, done reading); set from any thread
    done: bool = False  # a result or an error was delivered
    sampler: RowSampler | None = None
    decoder: IncrementalDecoder | None = None
    stops: StopStringFilter | None = None
    generated: int = 0
    started_at: float = 0.0
    first_token_at: float = 0.0

    @property
    def budget(self) -> int:
        return len(self.prompt_ids) + self.params.max_new_tokens


@dataclass
class EngineStats:
    """Counters for tests, /model-info and metrics."""

    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    decode_steps: int = 0
    prefills: int = 0
    largest_batch: int = 0
    batch_sizes_seen: collections.Counter[int] = field(default_factory=collections.Counter)


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


class EngineFrontEnd(abc.ABC):
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
        return self.state is EngineState.READY

    def _serving_formatter(self) -> PromptFormatter:
        """The prompt formatter, while the engine serves (or drains: info and tokenizing still work then)."""
        usable = self.state in (EngineState.READY, EngineState.DRAINING)
        if not usable or self.formatter is None:
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


class RequestHandle(RequestHandleBase):
    """One submitted request: iterate `events()` for its text as it comes, or await `result()`; `cancel()` stops it.
    Abandoning `events()` early (a closed stream, a cancelled task) cancels the request too."""

    def __init__(self, engine: Engine, sequence: _Sequence, events: asyncio.Queue[_Event]) -> None:
        self._engine = engine
        self._sequence = sequence
        self._events = events
        self.request_id = sequence.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self._sequence.prompt_ids)

    def cancel(self) -> None:
        self._engine._cancel(self._sequence)

    async def events(self) -> AsyncIterator[TextChunk | GenerationResult]:
        try:
            while True:
                event = await self._events.get()
                if isinstance(event, EngineError):
                    raise event
                yield event
                if isinstance(event, GenerationResult):
                    return
        finally:
            self.cancel()


class Engine(EngineFrontEnd):
    """Load once with `start()`; then `stream()`/`generate()` from any asyncio loop, from many tasks at once."""

    def __init__(self, settings: Settings, loader: Callable[[Settings], LoadedModel] = load_model) -> None:
        self.settings = settings
        self._loader = loader
        self.state = EngineState.STARTING
        self.failure: str | None = None
        self.loaded: LoadedModel | None = None
        self.formatter: PromptFormatter | None = None
        self.stats = EngineStats()
        self.observers = []  # called from the scheduler thread
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._batch = batching.RunningBatch(settings.max_batch_size)
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._eos_ids: set[int] = set()
        self._seeds = random.Random()
        self._ids = itertools.count(1)

    # ----- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread, which loads the model and warms it up; block until it is ready (or raise
        what made loading fail). Call it from a start-up thread."""
        self.state = EngineState.LOADING
        return_freed_memory_promptly()
        loaded = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(loaded, failure), name="engine-scheduler", daemon=True)
        self._thread.start()
        loaded.wait()
        if failure:
            raise failure[0]
        self.state = EngineState.READY

    def _load(self) -> None:
        torch.set_num_threads(self._threads)
        self.loaded = self._loader(self.settings)
        self.formatter = PromptFormatter(self.loaded.tokenizer)
        self._eos_ids = _eos_token_ids(self.loaded)
        self._warm_up()

    def drain(self) -> None:
        """Refuse new requests from now on; those already accepted keep running (see `shutdown`)."""
        if self.state is EngineState.READY:
            self.state = EngineState.DRAINING
            logger.info("Draining: %d running, %d waiting", len(self._running), len(self._waiting))

    @property
    def idle(self) -> bool:
        return not self._running and not self._waiting

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the scheduler; requests still in the engine get NotReadyError."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        for sequence in [*self._waiting, *self._running]:
            self._fail(sequence, NotReadyError("The server shut down before this request finished."))
        self._waiting.clear()
        self._running.clear()
        self.state = EngineState.STOPPED

    def _warm_up(self) -> None:
        assert self.loaded is not None
        prefilled, _ = batching.prefill(self.loaded.decoder, [[self._pad_id] * 4])
        if not batching.supports_slot_cache(prefilled.cache):
            raise ModelNotFoundError(
                f"MODEL_ID={self.settings.model_id!r} uses sliding-window or linear-attention layers, which this "
                "engine's batch cache does not support yet; choose a model with full attention (Llama, GPT-2, Qwen2)."
            )

    # ----- what callers use ---------------------------------------------------------------------------------------

    @property
    def _pad_id(self) -> int:
        assert self.loaded is not None
        return int(self.loaded.tokenizer.pad_token_id)

    def _require_ready(self) -> tuple[LoadedModel, PromptFormatter]:
        """The model and formatter, while the engine serves (or drains: info and tokenizing still work then)."""
        formatter = self._serving_formatter()
        assert self.loaded is not None  # loaded before the formatter is made
        return self.loaded, formatter

    @property
    def context_length(self) -> int:
        loaded, _ = self._require_ready()
        config = loaded.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return self.settings.max_input_tokens + self.settings.max_new_tokens

    def submit(
        self, prompt: PreparedPrompt, params: SamplingParams, *, request_id: str | None = None, route: str = "-"
    ) -> RequestHandle:
        """Queue a request (call it from an asyncio loop). Refusals (not ready, too long, queue full) raise here, at
        once, before any response is started; what happens later arrives through the handle."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Event] = asyncio.Queue()

        def deliver(event: _Event) -> None:
            # RuntimeError: the caller's loop is gone, so nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        sequence = self._submit(prompt, params, deliver, request_id=request_id, route=route)
        return RequestHandle(self, sequence, events)

    def _cancel(self, sequence: _Sequence) -> None:
        if not sequence.done:
            sequence.cancelled = True
            self._notify()

    def info(self) -> ModelInfo:
        """What is loaded and the limits this server enforces (served as /model-info)."""
        loaded, formatter = self._require_ready()
        settings = self.settings
        return ModelInfo(
            model_id=loaded.model_id,
            source=loaded.source,
            location=loaded.location,
            architecture=(loaded.config.architectures or [loaded.config.model_type])[0],
            parameters=loaded.parameters,
            dtype=str(loaded.dtype).removeprefix("torch."),
            weights=WeightsInfo.model_validate(dataclasses.asdict(loaded.weights)),
            device=str(loaded.device),
            context_length=self.context_length,
            has_chat_template=formatter.has_chat_template,
            limits=ServerLimits(
                max_input_tokens=settings.max_input_tokens,
                max_new_tokens=settings.max_new_tokens,
                max_batch_size=settings.max_batch_size,
                max_batch_tokens=settings.max_batch_tokens,
                max_queue_size=settings.max_queue_size,
                max_prompts=settings.max_prompts,
                max_concurrent_tokenizing=settings.max_concurrent_tokenizing,
                max_stop_sequences=settings.max_stop_sequences,
                max_stop_length=settings.max_stop_length,
                max_n=settings.max_n,
                max_body_bytes=settings.max_body_bytes,
                request_timeout_s=settings.request_timeout_s,
            ),
            version=__version__,
        )

    def snapshot(self) -> dict[str, int]:
        """Live figures: how many requests run and wait, and the current batch size."""
        return {"running": len(self._running), "waiting": len(self._waiting), "batch": self._batch.size}

    # ----- submission -----------------------------------------------------------------------------------------------

    def _submit(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        deliver: Callable[[_Event], None],
        *,
        request_id: str | None,
        route: str,
    ) -> _Sequence:
        self._refuse_early(prompt, params)
        if prompt.extra_stops:
            params = _with_stops(params, prompt.extra_stops)
        now = time.monotonic()
        sequence = _Sequence(
            request_id=request_id or uuid.uuid4().hex[:12],
            route=route,
            prompt_ids=prompt.token_ids,
            params=params,
            deliver=deliver,
            submitted_at=now,
            deadline=now + self.settings.request_timeout_s,
        )
        with self._wakeup:
            if len(self._waiting) >= self.settings.max_queue_size:
                raise QueueFullError(len(self._waiting))
            self._waiting.append(sequence)
            self._wakeup.notify()
        return sequence

    def _notify(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    # ----- the scheduler thread -----------------------------------------------------------------------------------

    @property
    def _threads(self) -> int:
        return self.settings.torch_threads or os.cpu_count() or 1

    def _run(self, loaded: threading.Event, failure: list[BaseException]) -> None:
        # All torch work happens on this one thread, loading included: a second thread running torch ops gets an
        # OpenMP team of its own, and two teams on 2 cores slowed batch-1 decoding from ~29 to ~17 tokens/s here.
        try:
            self._load()
        except Exception as exc:
            self.state = EngineState.FAILED
            self.failure = exc.message if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            logger.error("Model failed to load: %s", self.failure)
            failure.append(exc)
            return
        finally:
            loaded.set()
        while not self._stopping:
            try:
                self._step()
            except Exception:  # a fault in the step itself: fail what runs, keep serving
                logger.exception("Engine step failed; failing the running batch")
                for sequence in self._running:
                    self._fail(sequence, GenerationError("Generation failed inside the model."))
                self._running, self._batch = [], batching.RunningBatch(self.settings.max_batch_size)

    def _step(self) -> None:
        """One scheduler turn: drop cancelled and expired requests, admit newcomers, decode one token for every row."""
        self._drop_cancelled_and_expired()
        self._retire_finished()
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers)
        if self._running:
            self._decode()

    def _admit(self) -> list[_Sequence]:
        with self._wakeup:
            if not self._running and not self._waiting:
                self._wakeup.wait(timeout=0.1)
            if not self._running and self._waiting and self.settings.batch_wait_ms > 0:
                # idle engine: give companions a moment to arrive, so they share the first prefill
                deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
                while len(self._waiting) < self.settings.max_batch_size and time.monotonic() < deadline:
                    self._wakeup.wait(timeout=max(0.0, deadline - time.monotonic()))
            admitted: list[_Sequence] = []
            prefill_tokens = 0
            rows = len(self._running)
            # rows are right-aligned in one cache, so it holds rows x (the longest row) slots: budget that, not the sum
            widest = max((sequence.budget for sequence in self._running), default=0)
            while self._waiting and rows < self.settings.max_batch_size:
                candidate = self._waiting[0]
                if (rows + 1) * max(widest, candidate.budget) > self.settings.max_batch_tokens:
                    break  # first come, first served: later requests don't jump the queue
                if admitted and prefill_tokens + len(candidate.prompt_ids) > self.settings.max_prefill_tokens:
                    break  # the rest join at a later step: one huge prefill would stall the running rows for long
                admitted.append(self._waiting.popleft())
                rows, widest = rows + 1, max(widest, candidate.budget)
                prefill_tokens += len(candidate.prompt_ids)
            return admitted

    def _prefill(self, newcomers: list[_Sequence]) -> None:
        """Prefill newcomers in groups of one prompt length (no padding, so no row's numbers depend on another's)."""
        groups: dict[int, list[_Sequence]] = {}
        for sequence in newcomers:
            groups.setdefault(len(sequence.prompt_ids), []).append(sequence)
        for group in groups.values():
            self._prefill_group(group)
        # a prefill's activations leave the heaps fragmented; handing their free pages back keeps peak RSS near what
        # the weights and the KV cache need (-0.18 GB at 32 clients, measured: inference/memory.py)
        release_free_heap_pages()

    def _prefill_group(self, newcomers: list[_Sequence]) -> None:
        assert self.loaded is not None
        started = time.monotonic()
        for sequence in newcomers:
            sequence.started_at = started
            sequence.sampler = RowSampler.create(sequence.params, sequence.prompt_ids, self._seeds.getrandbits(63))
            sequence.decoder = IncrementalDecoder(self.loaded.tokenizer, sequence.prompt_ids)
            sequence.stops = StopStringFilter(sequence.params.stop)
        try:
            prefilled, logits = batching.prefill(self.loaded.decoder, [s.prompt_ids for s in newcomers])
            self._batch.add(prefilled, self._sample(newcomers, logits))
        except Exception:
            # newcomers are in neither the queue nor the running batch yet: fail them here, or they wait forever
            logger.exception("Prefill failed")
            for sequence in newcomers:
                self._fail(sequence, GenerationError("Generation failed inside the model."))
            return
        self.stats.prefills += 1
        self._running.extend(newcomers)
        self._retire_finished()

    def _decode(self) -> None:
        assert self.loaded is not None
        self.stats.decode_steps += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._running))
        self.stats.batch_sizes_seen[len(self._running)] += 1
        logits = self._batch.step(self.loaded.decoder)
        self._batch.next_tokens = self._sample(self._running, logits)
        self._retire_finished()

    def _sample(self, sequences: list[_Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Pick each row's next token and pass its text on; rows whose bookkeeping fails are failed alone."""
        samplers = [sequence.sampler for sequence in sequences]
        assert all(sampler is not None for sampler in samplers)
        tokens = sample_next_tokens(logits, samplers)  # type: ignore[arg-type]
        now = time.monotonic()
        for sequence, token in zip(sequences, tokens, strict=True):
            try:
                self._accept_token(sequence, token, now)
            except Exception:
                logger.exception("Request %s failed while decoding", sequence.request_id)
                self._fail(sequence, GenerationError("Generation failed while decoding this request."))
        return torch.tensor(tokens, dtype=torch.long, device=logits.device).unsqueeze(1)

    def _accept_token(self, sequence: _Sequence, token: int, now: float) -> None:
        assert sequence.sampler is not None
        assert sequence.decoder is not None
        assert sequence.stops is not None
        if sequence.generated == 0:
            sequence.first_token_at = now
        sequence.generated += 1
        if token in self._eos_ids:
            self._finish(sequence, "eos")
            return
        sequence.sampler.record(token)
        visible = sequence.stops.push(sequence.decoder.push(token))
        if visible:
            sequence.deliver(TextChunk(visible, sequence.generated))
        if sequence.stops.stopped:
            self._finish(sequence, "stop")
        elif sequence.generated >= sequence.params.max_new_tokens:
            self._finish(sequence, "length")

    def _retire_finished(self) -> None:
        """Take rows that finished, failed, were cancelled or timed out out of the running batch."""
        now = time.monotonic()
        for sequence in self._running:
            if sequence.done:
                continue
            if sequence.cancelled:
                self._end_cancelled(sequence)
            elif now > sequence.deadline:
                self._fail(sequence, RequestTimeoutError(self.settings.request_timeout_s))
        leaving = [index for index, sequence in enumerate(self._running) if sequence.done]
        if not leaving:
            return
        if len(leaving) == len(self._running):
            self._running, self._batch = [], batching.RunningBatch(self.settings.max_batch_size)
            return
        self._running = [self._running[index] for index in self._batch.remove(leaving)]

    def _drop_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        with self._wakeup:
            for sequence in list(self._waiting):
                if sequence.cancelled:
                    self._waiting.remove(sequence)
                    self._end_cancelled(sequence)
                elif now > sequence.deadline:
                    self._waiting.remove(sequence)
                    self._fail(sequence, RequestTimeoutError(self.settings.request_timeout_s))

    # ----- endings ----------------------------------------------------------------------------------------------

    def _finish(self, sequence: _Sequence, reason: str) -> None:
        assert sequence.stops is not None
        tail = sequence.stops.flush()
        if tail:
            sequence.deliver(TextChunk(tail, sequence.generated))
        now = time.monotonic()
        result = GenerationResult(
            request_id=sequence.request_id,
            text=sequence.stops.text,
            finish_reason=reason,
            prompt_tokens=len(sequence.prompt_ids),
            completion_tokens=sequence.generated,
            queue_seconds=sequence.started_at - sequence.submitted_at,
            time_to_first_token_seconds=sequence.first_token_at - sequence.submitted_at,
            generation_seconds=now - sequence.started_at,
            total_seconds=now - sequence.submitted_at,
        )
        sequence.done = True  # leaves the batch at the next retire
        self.stats.requests_finished += 1
        sequence.deliver(result)
        self._log(sequence, reason, result)

    def _end_cancelled(self, sequence: _Sequence) -> None:
        sequence.done = True
        self.stats.requests_cancelled += 1
        self._log(sequence, "cancelled")

    def _fail(self, sequence: _Sequence, error: EngineError) -> None:
        if sequence.done:
            return
        sequence.done = True
        self.stats.requests_failed += 1
        error.logged = True
        sequence.deliver(error)
        self._log(sequence, f"error:{error.type}")

    def _log(self, sequence: _Sequence, status: str, result: GenerationResult | None = None) -> None:
        """Each request's one log line, and its end told to the observers (metrics)."""
        self.report_end(sequence.route, status, result)
        if result is None:
            logger.info(
                "request id=%s route=%s prompt_tokens=%d generated_tokens=%d status=%s",
                sequence.request_id,
                sequence.route,
                len(sequence.prompt_ids),
                sequence.generated,
                status,
            )
            return
        logger.info(
            "request id=%s route=%s prompt_tokens=%d generated_tokens=%d queue_s=%.3f generation_s=%.3f "
            "tokens_per_s=%.1f status=%s",
            result.request_id,
            sequence.route,
            result.prompt_tokens,
            result.completion_tokens,
            result.queue_seconds,
            result.generation_seconds,
            result.tokens_per_second,
            status,
        )


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


def _with_stops(params: SamplingParams, extra: tuple[str, ...]) -> SamplingParams:
    return replace(params, stop=tuple(dict.fromkeys((*params.stop, *extra))))


def _eos_token_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    configured: Any = getattr(loaded.generation_config, "eos_token_id", None)
    for value in configured if isinstance(configured, list) else [configured]:
        if isinstance(value, int):
            ids.add(value)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return ids
