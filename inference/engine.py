"""The engine: owns the model and tokenizer, and a scheduler thread that batches every request continuously.

Requests join the running batch after their prefill and leave it the step they finish, so a short request is not
held behind a long one. `Engine._step` is the scheduler, read top to bottom. Callers (HTTP routes, Gradio events,
benchmarks) hold it as an `inference.client.EngineClient` and use `stream`/`generate` from any asyncio loop; each
request's own bookkeeping is an `inference.sequence.Sequence`. The engine knows nothing of HTTP or Gradio.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from inference import __version__
from inference import batch as batching
from inference.client import (
    EngineClient,
    EngineState,
    GenerationResult,
    RequestHandleBase,
    TextChunk,
    TokenLogprob,
)
from inference.errors import (
    EngineError,
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    QueueFullError,
    RequestTimeoutError,
)
from inference.fast_llama import LlamaDecoder
from inference.grammar import GrammarTokenizer
from inference.loader import LoadedModel, load_model
from inference.memory import release_free_heap_pages, return_freed_memory_promptly
from inference.params import SamplingParams
from inference.prefix_cache import MIN_PREFIX_TOKENS, CachedPrefix, PrefixStore
from inference.prompts import PreparedPrompt, PromptFormatter
from inference.sampling import sample_next_tokens
from inference.schemas import ModelInfo, ServerLimits, WeightsInfo
from inference.scoring import token_logprobs
from inference.sequence import Event, Sequence
from inference.settings import Settings

logger = logging.getLogger("inference.engine")


@dataclass
class EngineStats:
    """Counters for tests, /model-info and metrics."""

    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    decode_steps: int = 0
    prefills: int = 0
    # prompt tokens whose keys and values came from a cached prefix instead of a forward pass
    prefix_tokens_reused: int = 0
    largest_batch: int = 0
    batch_sizes_seen: collections.Counter[int] = field(default_factory=collections.Counter)


class RequestHandle(RequestHandleBase):
    """One submitted request: iterate `events()` for its text as it comes, or await `result()`; `cancel()` stops it.
    Abandoning `events()` early (a closed stream, a cancelled task) cancels the request too."""

    def __init__(self, engine: Engine, sequence: Sequence, events: asyncio.Queue[Event]) -> None:
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


class Engine(EngineClient):
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
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._batch = batching.RunningBatch(settings.max_batch_size)
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._eos_ids: set[int] = set()
        self._grammars: GrammarTokenizer | None = None
        self._seeds = random.Random()
        self.prefixes = PrefixStore()

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
        grammars = self._grammars = GrammarTokenizer(self.loaded.tokenizer, self._eos_ids)
        # built beside the warm-up rather than by the first request that asks for a grammar (a third of a second)
        threading.Thread(target=lambda: grammars.lltokenizer, daemon=True).start()
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
        assert self.formatter is not None
        prefilled, _ = batching.prefill(self.loaded.decoder, [[self._pad_id] * 4])
        if not batching.supports_slot_cache(prefilled.cache):
            raise ModelNotFoundError(
                f"MODEL_ID={self.settings.model_id!r} uses sliding-window or linear-attention layers, which this "
                "engine's batch cache does not support yet; choose a model with full attention (Llama, GPT-2, Qwen2)."
            )
        opening = self.formatter.chat_opening() if self.settings.prefix_caching else []
        if len(opening) >= MIN_PREFIX_TOKENS:
            self.remember_prefix(opening)
            logger.info("Prefix cache: the chat template's opening, %d tokens, is prefilled once", len(opening))

    def remember_prefix(self, tokens: list[int]) -> None:
        """Prefill `tokens` once and keep their keys and values for every prompt that opens with them (call it from
        the scheduler thread, or before it starts)."""
        assert self.loaded is not None
        cache, _ = self.loaded.decoder.prefill([tokens])
        self.prefixes.add(CachedPrefix.from_cache(tokens, cache))

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
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            # RuntimeError: the caller's loop is gone, so nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        sequence = self._submit(prompt, params, deliver, request_id=request_id, route=route)
        return RequestHandle(self, sequence, events)

    def _cancel(self, sequence: Sequence) -> None:
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
            forward="lean" if isinstance(loaded.decoder, LlamaDecoder) else "transformers",
            kv_cache_dtype=str(loaded.decoder.cache_dtype or loaded.dtype).removeprefix("torch."),
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
        deliver: Callable[[Event], None],
        *,
        request_id: str | None,
        route: str,
    ) -> Sequence:
        self._refuse_early(prompt, params)
        if prompt.extra_stops:
            params = _with_stops(params, prompt.extra_stops)
        now = time.monotonic()
        sequence = Sequence(
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
        # OpenMP team of its own, and two teams fight over the same cores and slow decoding (see docs/benchmarks.md).
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
        """One scheduler turn: the whole life of a token, one stage per line (as TGI's `generate_token` reads)."""
        # expire: requests whose caller left or whose REQUEST_TIMEOUT_S passed end, whether they wait or run
        self._expire()
        # retire: rows whose request ended leave the batch, so they take no place in it and are not decoded
        self._retire()
        # wait for work: sleep while nothing waits or runs; an idle engine gives a newcomer's companions a moment
        self._wait_for_work()
        # admit: from the front of the queue, the requests the batch's row and token budgets have room for
        newcomers = self._admit()
        # prefill: newcomers' prompts through the model; each samples and accepts its first token, then joins
        self._prefill(newcomers)
        # retire: rows that ended with their first token leave before the decode
        self._retire()
        if not self._running:
            return
        # decode: one forward pass, one new position for every running row
        logits = self._decode()
        # sample: each row's next token, by its own parameters; the batch feeds it in at the next decode
        tokens, logprobs = self._sample(self._running, logits)
        self._batch.next_tokens = _as_column(tokens, logits.device)
        # accept: each request takes its token: text out to its caller, and whether and why it finished
        self._accept(self._running, tokens, logprobs)
        # retire: rows whose request finished or failed leave the batch
        self._retire()

    def _expire(self) -> None:
        """End every request whose caller left (Stop, disconnect) or whose REQUEST_TIMEOUT_S passed, waiting or
        running; running rows leave the batch at the next retire."""
        now = time.monotonic()
        with self._wakeup:
            leaving_queue = [sequence for sequence in self._waiting if sequence.cancelled or now > sequence.deadline]
            for sequence in leaving_queue:
                self._waiting.remove(sequence)
        leaving_batch = [
            sequence
            for sequence in self._running
            if not sequence.done and (sequence.cancelled or now > sequence.deadline)
        ]
        for sequence in [*leaving_queue, *leaving_batch]:
            if sequence.cancelled:
                self._end_cancelled(sequence)
            else:
                self._fail(sequence, RequestTimeoutError(self.settings.request_timeout_s))

    def _wait_for_work(self) -> None:
        """Sleep while nothing waits or runs (a submit, a cancel or a shutdown wakes it, or 0.1 s passes). An idle
        engine that has a request waits up to BATCH_WAIT_MS for companions, so they share its first prefill."""
        with self._wakeup:
            if not self._running and not self._waiting:
                self._wakeup.wait(timeout=0.1)
            if not self._running and self._waiting and self.settings.batch_wait_ms > 0:
                deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
                while len(self._waiting) < self.settings.max_batch_size and time.monotonic() < deadline:
                    self._wakeup.wait(timeout=max(0.0, deadline - time.monotonic()))

    def _admit(self) -> list[Sequence]:
        """Take from the queue the requests that join the batch now (`admission_count` says how many)."""
        with self._wakeup:
            count = admission_count(self._waiting, self._running, self.settings)
            return [self._waiting.popleft() for _ in range(count)]

    def _prefill(self, newcomers: list[Sequence]) -> None:
        """Prefill newcomers in groups of one prompt length (no padding, so no row's numbers depend on another's)."""
        if not newcomers:
            return
        groups: dict[tuple[int, CachedPrefix | None], list[Sequence]] = {}
        for sequence in newcomers:
            prefix = self.prefixes.longest_opening(sequence.prompt_ids)
            groups.setdefault((len(sequence.prompt_ids), prefix), []).append(sequence)
        for (_, prefix), group in groups.items():
            self._prefill_group(group, prefix)
        # a prefill's activations leave the heaps fragmented; handing their free pages back keeps peak RSS near what
        # the weights and the KV cache need (why: inference/memory.py; figures: docs/benchmarks.md)
        release_free_heap_pages()

    def _prefill_group(self, newcomers: list[Sequence], prefix: CachedPrefix | None) -> None:
        """One forward pass over same-length prompts (after the cached `prefix` they open with, if any); their first
        tokens go through sample and accept as a decode's do, and the rows join the running batch. A fault fails
        this group alone."""
        assert self.loaded is not None
        started = time.monotonic()
        try:
            for sequence in newcomers:
                seed = self._seeds.getrandbits(63)
                sequence.start(self.loaded.tokenizer, self._eos_ids, seed, started, self._grammars)
            for sequence in newcomers:
                if sequence.params.prompt_logprobs is not None:
                    # a second pass over the prompt, for the few requests that ask (OpenAI's echo, lm-eval's scores)
                    scores = self.loaded.decoder.prompt_logprobs(sequence.prompt_ids, sequence.params.prompt_logprobs)
                    sequence.prompt_logprobs = [None, *scores]
            prefilled, logits = batching.prefill(self.loaded.decoder, [s.prompt_ids for s in newcomers], prefix)
            tokens, logprobs = self._sample(newcomers, logits)
            self._accept(newcomers, tokens, logprobs)
            self._batch.add(prefilled, _as_column(tokens, logits.device))
        except Exception:
            # newcomers are in neither the queue nor the running batch yet: fail them here, or they wait forever
            logger.exception("Prefill failed")
            for sequence in newcomers:
                self._fail(sequence, GenerationError("Generation failed inside the model."))
            return
        self.stats.prefills += 1
        self.stats.prefix_tokens_reused += len(prefix or ()) * len(newcomers)
        self._running.extend(newcomers)

    def _decode(self) -> torch.Tensor:
        """The forward pass over every running row's newest token; returns the logits of the token after it."""
        assert self.loaded is not None
        self.stats.decode_steps += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._running))
        self.stats.batch_sizes_seen[len(self._running)] += 1
        return self._batch.step(self.loaded.decoder)

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each row's next token, by its own parameters and random stream; and its log-probability where asked."""
        samplers = [sequence.sampler for sequence in sequences]
        assert all(sampler is not None for sampler in samplers)
        tokens = sample_next_tokens(logits, samplers)  # type: ignore[arg-type]
        wanted = [sequence.params.top_logprobs if sequence.params.logprobs else None for sequence in sequences]
        return tokens, token_logprobs(logits, tokens, wanted)

    def _accept(self, sequences: list[Sequence], tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Hand each request its token; a request whose bookkeeping fails is failed alone, the batch goes on."""
        now = time.monotonic()
        for sequence, token, logprob in zip(sequences, tokens, logprobs, strict=True):
            try:
                self._accept_token(sequence, token, logprob, now)
            except Exception:
                logger.exception("Request %s failed while decoding", sequence.request_id)
                self._fail(sequence, GenerationError("Generation failed while decoding this request."))

    def _accept_token(self, sequence: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> None:
        """Hand one sampled token to its request: pass on the text it makes visible, end the request if it is done."""
        if sequence.generated == 0:
            sequence.first_token_at = now
        constraint = sequence.sampler.constraint if sequence.sampler is not None else None
        if constraint is not None and constraint.error is not None:
            message = f"The requested output format could not be followed: {constraint.error}"
            self._fail(sequence, InvalidRequestError(message, param="response_format"))
            return
        visible, finish_reason = sequence.accept(token, logprob)
        if visible:
            sequence.deliver(TextChunk(visible, sequence.generated, *sequence.unreported()))
        if finish_reason is not None:
            self._finish(sequence, finish_reason)

    def _retire(self) -> None:
        """Take the rows whose request ended (finished, failed, cancelled, timed out) out of the running batch."""
        leaving = [index for index, sequence in enumerate(self._running) if sequence.done]
        if not leaving:
            return
        if len(leaving) == len(self._running):
            self._running, self._batch = [], batching.RunningBatch(self.settings.max_batch_size)
            return
        self._running = [self._running[index] for index in self._batch.remove(leaving)]

    # ----- endings ----------------------------------------------------------------------------------------------

    def _finish(self, sequence: Sequence, reason: str) -> None:
        tail = sequence.flush()
        if tail:
            sequence.deliver(TextChunk(tail, sequence.generated, *sequence.unreported()))
        now = time.monotonic()
        result = GenerationResult(
            request_id=sequence.request_id,
            text=sequence.text,
            finish_reason=reason,
            prompt_tokens=len(sequence.prompt_ids),
            completion_tokens=sequence.generated,
            queue_seconds=sequence.started_at - sequence.submitted_at,
            time_to_first_token_seconds=sequence.first_token_at - sequence.submitted_at,
            generation_seconds=now - sequence.started_at,
            total_seconds=now - sequence.submitted_at,
            token_ids=tuple(sequence.token_ids),
            logprobs=tuple(sequence.logprobs),
            seed=sequence.seed,
            top_logprobs=tuple(sequence.top_logprobs),
            prompt_logprobs=tuple(sequence.prompt_logprobs),
        )
        sequence.done = True  # leaves the batch at the next retire
        self.stats.requests_finished += 1
        sequence.deliver(result)
        self._log(sequence, reason, result)

    def _end_cancelled(self, sequence: Sequence) -> None:
        sequence.done = True
        self.stats.requests_cancelled += 1
        self._log(sequence, "cancelled")

    def _fail(self, sequence: Sequence, error: EngineError) -> None:
        if sequence.done:
            return
        sequence.done = True
        self.stats.requests_failed += 1
        error.logged = True
        sequence.deliver(error)
        self._log(sequence, f"error:{error.type}")

    def _log(self, sequence: Sequence, status: str, result: GenerationResult | None = None) -> None:
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


def admission_count(waiting: Iterable[Sequence], running: list[Sequence], settings: Settings) -> int:
    """How many requests from the front of the queue join the running batch now: as many as fit MAX_BATCH_SIZE rows
    and MAX_BATCH_TOKENS cache slots, with at most MAX_PREFILL_TOKENS of prompt (past the first newcomer's)."""
    count = prefill_tokens = 0
    rows = len(running)
    # rows are right-aligned in one cache, so it holds rows x (the longest row) slots: budget that, not the sum
    widest = max((sequence.budget for sequence in running), default=0)
    for candidate in waiting:
        if rows >= settings.max_batch_size:
            break
        if (rows + 1) * max(widest, candidate.budget) > settings.max_batch_tokens:
            break  # first come, first served: later requests don't jump the queue
        if count and prefill_tokens + len(candidate.prompt_ids) > settings.max_prefill_tokens:
            break  # the rest join at a later step: one huge prefill would stall the running rows for long
        count, rows, widest = count + 1, rows + 1, max(widest, candidate.budget)
        prefill_tokens += len(candidate.prompt_ids)
    return count


def _as_column(tokens: list[int], device: torch.device) -> torch.Tensor:
    """Sampled tokens as the [rows, 1] tensor the batch feeds to its next forward pass."""
    return torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)


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
