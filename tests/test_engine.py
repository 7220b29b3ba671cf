"""The engine on tiny random models: batching must not change any request's output, and every limit must hold."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
)

from inference import engine as engine_module
from inference import prompts
from inference.client import EngineState, GenerationResult, TextChunk
from inference.engine import Engine, admission_count
from inference.errors import (
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    PromptTooLongError,
    QueueFullError,
    RequestTimeoutError,
)
from inference.params import SamplingParams, build_sampling_params
from inference.prompts import ChatMessage, PreparedPrompt, transcript
from inference.sequence import Sequence
from inference.settings import Settings

T = TypeVar("T")
EngineFactory = Callable[..., Engine]

PROMPTS = [
    "Hi",
    "a",
    "The quick brown fox",
    "Paris is the capital of France. Berlin is",
    "What is the weather like today? It is sunny and warm, with a light wind from the west. Tomorrow it may rain, so",
    "Hello world! This is a test of the serving engine. It batches many requests together and streams their text "
    "back as soon as each new token is ready. Short requests should not",
]


def run(coroutine: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
    """Run a coroutine on a fresh loop; a request the engine loses fails the test instead of hanging the suite."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout_s)

    return asyncio.run(bounded())


def greedy(engine: Engine, max_new_tokens: int = 30, **overrides: Any) -> SamplingParams:
    return build_sampling_params(engine.settings, temperature=0.0, max_new_tokens=max_new_tokens, **overrides)


def tokenizer_of(engine: Engine) -> PreTrainedTokenizerBase:
    assert engine.loaded is not None
    return engine.loaded.tokenizer


async def collect(
    engine: Engine, prompt: PreparedPrompt, params: SamplingParams
) -> tuple[list[TextChunk], GenerationResult]:
    chunks: list[TextChunk] = []
    async for event in engine.stream(prompt, params):
        if isinstance(event, TextChunk):
            chunks.append(event)
        else:
            return chunks, event
    raise AssertionError("the stream ended without a result")


async def first_chunk(stream: Any) -> TextChunk:
    """Read a stream up to its first text chunk (the request is then running)."""
    event = await anext(stream)
    assert isinstance(event, TextChunk), event
    return event


async def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def load_of(engine: Engine) -> tuple[int, int]:
    """(running, waiting) from the engine's live figures."""
    snapshot = engine.snapshot()
    return snapshot["running"], snapshot["waiting"]


def is_idle(engine: Engine) -> bool:
    return load_of(engine) == (0, 0)


def settles(engine: Engine, timeout_s: float = 3.0) -> bool:
    """True once the engine holds no request. A result reaches the caller a moment before the scheduler thread has
    taken its row out of the batch, so checks right after a result must allow for that moment."""
    deadline = time.monotonic() + timeout_s
    while not is_idle(engine):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@functools.cache
def transformers_model(folder: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def reference_greedy(engine: Engine, prompt_ids: list[int], steps: int, repetition_penalty: float = 1.0) -> list[int]:
    """Greedy tokens from transformers' plain full forward passes (no cache, no batching) and its own repetition
    penalty, stopping after an eos like the engine."""
    model = transformers_model(engine.settings.model_id)
    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty)
    tokens = list(prompt_ids)
    produced: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            context = torch.tensor([tokens])
            scores = model(context).logits[:, -1].float()
            if repetition_penalty != 1.0:
                scores = penalty(context, scores.clone())
            token = int(scores[0].argmax())
            produced.append(token)
            tokens.append(token)
            if token in engine._eos_ids:
                break
    return produced


def assert_text_of(engine: Engine, text: str, tokens: list[int]) -> None:
    """`text` is what `tokens` decode to (an unfinished character at the very end is held back by the engine)."""
    full = tokenizer_of(engine).decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if full.endswith("\ufffd"):
        assert full.startswith(text)
        assert len(text) >= len(full) - 4
    else:
        assert text == full


def patch_forward(monkeypatch: pytest.MonkeyPatch, engine: Engine, before_call: Callable[[int], None]) -> None:
    """Wrap the engine's decoder: `before_call(n)` runs before its n-th forward pass (1-based; prefills and decode
    steps alike), to delay or fail it. Patching the model, not the batching code, keeps these tests independent of
    how batches are kept."""
    assert engine.loaded is not None
    decoder = engine.loaded.decoder
    calls = itertools.count(1)
    for name in ("prefill", "decode"):
        original = getattr(decoder, name)

        def forward(*args: Any, original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            before_call(next(calls))
            return original(*args, **kwargs)

        monkeypatch.setattr(decoder, name, forward)


@pytest.fixture
def slow_engine(make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> EngineFactory:
    """`slow_engine(folder, seconds, **settings)`: an engine that ignores EOS (every request runs to its
    max_new_tokens) and whose every forward pass takes at least `seconds`, so timing-based tests are robust."""

    def build(folder: Path, seconds: float, **overrides: Any) -> Engine:
        engine = make_engine(folder, **overrides)
        engine._eos_ids = set()
        patch_forward(monkeypatch, engine, lambda _: time.sleep(seconds))
        return engine

    return build


def fail_on_call(number: int) -> Callable[[int], None]:
    def before_call(call: int) -> None:
        if call == number:
            raise RuntimeError("boom")

    return before_call


@pytest.fixture
def no_eos(monkeypatch: pytest.MonkeyPatch, tiny_engine: Engine) -> Engine:
    """The shared tiny engine with eos ignored, so every request runs to max_new_tokens."""
    monkeypatch.setattr(tiny_engine, "_eos_ids", set())
    return tiny_engine


# ----- correctness: batching changes nothing ------------------------------------------------------------------------


def test_greedy_matches_plain_forward_passes(tiny_engine: Engine) -> None:
    for text in PROMPTS[2:5]:
        prompt = tiny_engine.prepare_completion(text)
        result = run(tiny_engine.generate(prompt, greedy(tiny_engine, 25)))
        expected = reference_greedy(tiny_engine, prompt.token_ids, 25)
        assert result.completion_tokens == len(expected)
        if expected[-1] in tiny_engine._eos_ids:
            assert result.finish_reason == "eos"
            expected = expected[:-1]
        else:
            assert result.finish_reason == "length"
        assert_text_of(tiny_engine, result.text, expected)


@pytest.mark.parametrize("penalty", [1.3, 3.0])
def test_repetition_penalty_matches_transformers(no_eos: Engine, penalty: float) -> None:
    prompt = no_eos.prepare_completion(PROMPTS[3])
    result = run(no_eos.generate(prompt, greedy(no_eos, 25, repetition_penalty=penalty)))
    expected = reference_greedy(no_eos, prompt.token_ids, 25, repetition_penalty=penalty)
    assert result.completion_tokens == 25
    assert_text_of(no_eos, result.text, expected)
    assert expected != reference_greedy(no_eos, prompt.token_ids, 25)  # the penalty did change something


def test_greedy_output_is_the_same_alone_and_batched(tiny_engine: Engine) -> None:
    params = [greedy(tiny_engine, 20 + 5 * index) for index in range(len(PROMPTS))]
    prepared = [tiny_engine.prepare_completion(text) for text in PROMPTS]
    assert len({len(p.token_ids) for p in prepared}) == len(PROMPTS)  # all different lengths: real left padding
    alone = [run(tiny_engine.generate(p, q)) for p, q in zip(prepared, params, strict=True)]
    largest_before = tiny_engine.stats.batch_sizes_seen.copy()

    async def together() -> list[GenerationResult]:
        return await asyncio.gather(*(tiny_engine.generate(p, q) for p, q in zip(prepared, params, strict=True)))

    batched = run(together())
    seen = tiny_engine.stats.batch_sizes_seen - largest_before
    assert max(seen) >= 4  # they really ran together
    for one, many in zip(alone, batched, strict=True):
        assert (many.text, many.finish_reason, many.completion_tokens) == (
            one.text,
            one.finish_reason,
            one.completion_tokens,
        )
        assert one.text  # a random model still says something


def test_greedy_output_is_the_same_when_requests_join_midway(no_eos: Engine) -> None:
    """Each request joins the running batch after the previous one started: merges with wider and narrower rows."""
    engine = no_eos
    order = [PROMPTS[3], PROMPTS[0], PROMPTS[5], PROMPTS[2], PROMPTS[4]]
    prepared = [engine.prepare_completion(text) for text in order]
    params = greedy(engine, 40)
    alone = [run(engine.generate(p, params)).text for p in prepared]
    prefills_before = engine.stats.prefills

    async def staggered() -> list[str]:
        async def one(index: int, started: asyncio.Event, previous: asyncio.Event | None) -> str:
            if previous is not None:
                await previous.wait()
            chunks, result = [], None
            async for event in engine.stream(prepared[index], params):
                if isinstance(event, TextChunk):
                    chunks.append(event.text)
                    started.set()
                else:
                    result = event
            assert result is not None
            assert "".join(chunks) == result.text
            return result.text

        events = [asyncio.Event() for _ in prepared]
        tasks = [one(i, events[i], events[i - 1] if i else None) for i in range(len(prepared))]
        return list(await asyncio.gather(*tasks))

    assert run(staggered()) == alone
    assert engine.stats.prefills - prefills_before == len(prepared)  # one prefill each: every one joined a batch


def test_long_generations_with_rows_leaving_in_any_order(llama_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of steps (the batch's cache must grow while decoding), rows that finish first, last and in the middle,
    and a request that joins late: every output is still what the request gives alone."""
    engine = llama_engine
    monkeypatch.setattr(engine, "_eos_ids", set())
    plan = [(PROMPTS[2], 260), (PROMPTS[0], 90), (PROMPTS[5], 200), (PROMPTS[3], 40), (PROMPTS[4], 150)]
    prepared = [(engine.prepare_completion(text), greedy(engine, limit)) for text, limit in plan]
    alone = [run(engine.generate(p, q)).text for p, q in prepared]

    async def mixed() -> list[str]:
        async def late(p: PreparedPrompt, q: SamplingParams) -> GenerationResult:
            await wait_until(lambda: engine.stats.decode_steps >= steps_before + 170)
            return await engine.generate(p, q)

        steps_before = engine.stats.decode_steps
        first = [engine.generate(p, q) for p, q in prepared[:-1]]
        results = await asyncio.gather(*first, late(*prepared[-1]))
        return [result.text for result in results]

    assert run(mixed()) == alone


def test_seeded_sampling_is_the_same_alone_and_batched(tiny_engine: Engine) -> None:
    settings = tiny_engine.settings
    params = [
        build_sampling_params(settings, temperature=1.0, top_p=1.0, top_k=0, seed=1, max_new_tokens=25),
        build_sampling_params(settings, temperature=0.7, top_p=0.9, top_k=50, seed=2, max_new_tokens=30),
        build_sampling_params(settings, temperature=1.5, top_k=10, seed=3, max_new_tokens=20),
        build_sampling_params(settings, temperature=0.0, max_new_tokens=15),
        build_sampling_params(settings, temperature=1.2, repetition_penalty=1.3, seed=4, max_new_tokens=25),
    ]
    prepared = [tiny_engine.prepare_completion(text) for text in PROMPTS[1:6]]
    alone = [run(tiny_engine.generate(p, q)).text for p, q in zip(prepared, params, strict=True)]
    again = [run(tiny_engine.generate(p, q)).text for p, q in zip(prepared, params, strict=True)]
    assert again == alone

    async def together() -> list[GenerationResult]:
        return await asyncio.gather(*(tiny_engine.generate(p, q) for p, q in zip(prepared, params, strict=True)))

    assert [result.text for result in run(together())] == alone


def test_different_seeds_give_different_text(no_eos: Engine) -> None:
    prompt = no_eos.prepare_completion(PROMPTS[2])

    def sample(seed: int | None) -> str:
        params = build_sampling_params(
            no_eos.settings, temperature=1.5, top_k=0, top_p=1.0, seed=seed, max_new_tokens=30
        )
        return run(no_eos.generate(prompt, params)).text

    assert sample(1) != sample(2)
    assert sample(None) != sample(None)  # unseeded requests get fresh seeds


def test_requests_from_several_threads_and_loops(tiny_engine: Engine) -> None:
    prepared = [tiny_engine.prepare_completion(text) for text in PROMPTS[:4]]
    params = greedy(tiny_engine, 20)
    alone = [run(tiny_engine.generate(p, params)).text for p in prepared]
    results: dict[int, str] = {}

    def worker(index: int) -> None:
        results[index] = run(tiny_engine.generate(prepared[index], params)).text

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(prepared))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [results[index] for index in range(len(prepared))] == alone


# ----- streaming and results ----------------------------------------------------------------------------------------


def test_stream_chunks_join_to_the_final_text(no_eos: Engine) -> None:
    prompt = no_eos.prepare_completion(PROMPTS[3])
    chunks, result = run(collect(no_eos, prompt, greedy(no_eos, 40)))
    assert "".join(chunk.text for chunk in chunks) == result.text
    assert all(chunk.text for chunk in chunks)
    counts = [chunk.completion_tokens for chunk in chunks]
    assert counts == sorted(counts)
    assert counts[-1] <= 40
    assert result.finish_reason == "length"
    assert result.completion_tokens == 40
    assert result.prompt_tokens == len(prompt.token_ids)
    assert 0 <= result.queue_seconds <= result.time_to_first_token_seconds <= result.total_seconds
    assert 0 < result.generation_seconds <= result.total_seconds
    assert result.tokens_per_second > 0
    assert result.request_id


def test_request_id_is_kept(tiny_engine: Engine) -> None:
    prompt = tiny_engine.prepare_completion("Hi")
    result = run(tiny_engine.generate(prompt, greedy(tiny_engine, 2), request_id="req-123"))
    assert result.request_id == "req-123"


def test_finish_reason_length(no_eos: Engine) -> None:
    prompt = no_eos.prepare_completion(PROMPTS[2])
    for limit in (1, 3):
        result = run(no_eos.generate(prompt, greedy(no_eos, limit)))
        assert (result.finish_reason, result.completion_tokens) == ("length", limit)


def test_finish_reason_stop_cuts_before_the_stop_string(no_eos: Engine) -> None:
    prompt = no_eos.prepare_completion(PROMPTS[4])
    full = run(no_eos.generate(prompt, greedy(no_eos, 40))).text
    # a stop string taken from the middle of the greedy text, free of replacement characters
    start = next(i for i in range(8, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    stop = full[start : start + 3]
    chunks, result = run(collect(no_eos, prompt, greedy(no_eos, 40, stop=[stop])))
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert "".join(chunk.text for chunk in chunks) == result.text
    assert result.completion_tokens < 40


def test_finish_reason_eos(tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = tiny_engine.prepare_completion(PROMPTS[3])
    monkeypatch.setattr(tiny_engine, "_eos_ids", set())
    tokens = reference_greedy(tiny_engine, prompt.token_ids, 12)
    # declare eos a token the model produces a few steps in (and not before): the engine must end right there
    index = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    monkeypatch.setattr(tiny_engine, "_eos_ids", {tokens[index]})
    result = run(tiny_engine.generate(prompt, greedy(tiny_engine, 12)))
    assert result.finish_reason == "eos"
    assert result.completion_tokens == index + 1  # the eos counts as generated, its text is not shown
    assert_text_of(tiny_engine, result.text, tokens[:index])


def test_real_eos_ids_come_from_the_tokenizer_and_generation_config(gpt2_engine: Engine, llama_engine: Engine) -> None:
    assert gpt2_engine._eos_ids == {tokenizer_of(gpt2_engine).convert_tokens_to_ids("<|endoftext|>")}
    assert llama_engine._eos_ids == {tokenizer_of(llama_engine).convert_tokens_to_ids("<|im_end|>")}


# ----- joining, cancelling, limits ----------------------------------------------------------------------------------


def test_short_requests_join_a_running_batch_and_finish_first(tiny_gpt2_dir: Path, slow_engine: EngineFactory) -> None:
    engine = slow_engine(tiny_gpt2_dir, 0.002)
    finished: list[str] = []

    async def main() -> None:
        long_params = greedy(engine, 150)
        long_stream = engine.stream(engine.prepare_completion(PROMPTS[3]), long_params)
        await first_chunk(long_stream)

        async def finish_long() -> None:
            async for event in long_stream:
                if isinstance(event, GenerationResult):
                    assert event.completion_tokens == 150
            finished.append("long")

        async def short(index: int) -> None:
            result = await engine.generate(engine.prepare_completion(PROMPTS[index]), greedy(engine, 5))
            assert result.completion_tokens == 5
            finished.append(f"short-{index}")

        await asyncio.gather(finish_long(), short(0), short(1), short(2))

    run(main())
    assert finished[-1] == "long"
    assert sorted(finished[:-1]) == ["short-0", "short-1", "short-2"]
    assert engine.stats.largest_batch >= 2
    assert engine.stats.prefills >= 2  # the short ones were prefilled while the long one ran


def test_leaving_the_stream_cancels_and_frees_the_slot(tiny_llama_dir: Path, slow_engine: EngineFactory) -> None:
    engine = slow_engine(tiny_llama_dir, 0.005)

    async def main() -> None:
        async for event in engine.stream(engine.prepare_completion(PROMPTS[2]), greedy(engine, 300)):
            assert isinstance(event, TextChunk)
            break  # the client went away
        await wait_until(lambda: engine.snapshot()["running"] == 0, timeout_s=2.0)

    run(main())
    assert engine.stats.requests_cancelled == 1
    assert engine.stats.requests_finished == 0
    steps = engine.stats.decode_steps
    time.sleep(0.05)
    assert engine.stats.decode_steps == steps  # nothing left to decode
    assert settles(engine)
    # the freed engine serves the next request
    assert run(engine.generate(engine.prepare_completion("Hi"), greedy(engine, 3))).completion_tokens == 3


def test_submit_refuses_at_once_before_any_event(tiny_gpt2_dir: Path, make_engine: EngineFactory) -> None:
    engine = make_engine(tiny_gpt2_dir, max_input_tokens=10)

    async def main() -> None:
        with pytest.raises(PromptTooLongError):
            engine.submit(engine.prepare_completion(PROMPTS[4]), greedy(engine, 5))  # no await: refused right here
        with pytest.raises(InvalidRequestError):
            engine.submit(PreparedPrompt([]), greedy(engine, 5))
        handle = engine.submit(engine.prepare_completion("Hi"), greedy(engine, 4), request_id="abc")
        assert handle.request_id == "abc"
        assert handle.prompt_tokens == len(engine.prepare_completion("Hi").token_ids)
        assert (await handle.result()).completion_tokens <= 4

    run(main())


def test_handle_cancel_stops_a_running_request(tiny_llama_dir: Path, slow_engine: EngineFactory) -> None:
    engine = slow_engine(tiny_llama_dir, 0.005)

    async def main() -> None:
        handle = engine.submit(engine.prepare_completion(PROMPTS[2]), greedy(engine, 300))
        events = handle.events()  # held, so only cancel() can stop the request (not the stream's clean-up)
        await first_chunk(events)
        handle.cancel()
        await wait_until(lambda: engine.snapshot()["running"] == 0, timeout_s=2.0)
        assert engine.stats.requests_cancelled == 1
        await events.aclose()

    run(main())
    assert engine.stats.requests_cancelled == 1
    assert engine.stats.requests_finished == 0


def test_cancelling_a_waiting_request_removes_it_from_the_queue(
    tiny_gpt2_dir: Path, slow_engine: EngineFactory
) -> None:
    engine = slow_engine(tiny_gpt2_dir, 0.003, max_batch_size=1)

    async def main() -> None:
        first = engine.stream(engine.prepare_completion(PROMPTS[2]), greedy(engine, 60))
        await first_chunk(first)
        waiting = asyncio.create_task(engine.generate(engine.prepare_completion("Hi"), greedy(engine, 5)))
        await wait_until(lambda: engine.snapshot()["waiting"] == 1)
        waiting.cancel()
        await wait_until(lambda: engine.snapshot()["waiting"] == 0)
        assert engine.stats.requests_cancelled == 1
        assert engine.snapshot()["running"] == 1  # the first one carries on
        async for event in first:
            if isinstance(event, GenerationResult):
                assert event.completion_tokens == 60

    run(main())
    assert engine.stats.requests_finished == 1


def test_full_queue_refuses_at_once(tiny_gpt2_dir: Path, slow_engine: EngineFactory) -> None:
    engine = slow_engine(tiny_gpt2_dir, 0.005, max_batch_size=1, max_queue_size=1)

    async def main() -> None:
        running = engine.stream(engine.prepare_completion(PROMPTS[2]), greedy(engine, 200))
        await first_chunk(running)
        queued = asyncio.create_task(engine.generate(engine.prepare_completion("Hi"), greedy(engine, 3)))
        await wait_until(lambda: load_of(engine) == (1, 1))
        with pytest.raises(QueueFullError) as caught:
            await engine.generate(engine.prepare_completion("a"), greedy(engine, 3))
        assert caught.value.type == "overloaded_error"
        assert caught.value.retry_after_s >= 1
        assert "1 requests are already waiting" in caught.value.message
        await running.aclose()  # frees the slot: the queued one runs and finishes
        assert (await queued).completion_tokens == 3
        # and the queue takes requests again
        assert (await engine.generate(engine.prepare_completion("a"), greedy(engine, 2))).completion_tokens == 2

    run(main())


def test_request_timeout(tiny_llama_dir: Path, slow_engine: EngineFactory) -> None:
    engine = slow_engine(tiny_llama_dir, 0.005, request_timeout_s=0.3, max_batch_size=1)

    async def main() -> None:
        async def long_one() -> list[TextChunk]:
            chunks: list[TextChunk] = []

            async def read() -> None:
                async for event in engine.stream(engine.prepare_completion(PROMPTS[3]), greedy(engine, 400)):
                    assert isinstance(event, TextChunk)
                    chunks.append(event)

            with pytest.raises(RequestTimeoutError) as caught:
                await read()
            assert caught.value.type == "timeout_error"
            assert "0.3 seconds" in caught.value.message
            return chunks

        async def queued_one() -> None:
            await asyncio.sleep(0.05)  # arrives while the long one holds the only slot
            with pytest.raises(RequestTimeoutError):
                await engine.generate(engine.prepare_completion("Hi"), greedy(engine, 400))

        started = time.monotonic()
        chunks, _ = await asyncio.gather(long_one(), queued_one())
        assert chunks  # it streamed for a while before it was stopped
        assert 0.3 <= time.monotonic() - started < 3.0

    run(main())
    assert engine.stats.requests_failed == 2
    assert settles(engine)


def test_batch_token_budget_limits_the_batch(
    tiny_gpt2_dir: Path, make_engine: EngineFactory, gpt2_engine: Engine
) -> None:
    engine = make_engine(tiny_gpt2_dir, max_batch_tokens=100, batch_wait_ms=50)
    engine._eos_ids = set()
    texts = ["The quick brown fox", "Paris is the capital", "Hello world! This is", "What is the weather"]
    prepared = [engine.prepare_completion(text) for text in texts]
    assert all(len(p.token_ids) <= 12 for p in prepared)
    params = greedy(engine, 35)  # each needs at most 47 tokens: two fit in 100, three do not

    async def together() -> list[GenerationResult]:
        return await asyncio.gather(*(engine.generate(p, params) for p in prepared))

    results = run(together())
    assert engine.stats.largest_batch == 2
    assert all(result.completion_tokens == 35 for result in results)
    # the budget changes when requests run, not what they say
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpt2_engine, "_eos_ids", set())
        assert [result.text for result in results] == [run(gpt2_engine.generate(p, params)).text for p in prepared]


def test_a_request_bigger_than_the_token_budget_is_refused(tiny_gpt2_dir: Path, make_engine: EngineFactory) -> None:
    engine = make_engine(tiny_gpt2_dir, max_batch_tokens=100)
    prompt = engine.prepare_completion("The quick brown fox")
    with pytest.raises(InvalidRequestError) as caught:
        run(engine.generate(prompt, greedy(engine, 101 - len(prompt.token_ids))))
    assert caught.value.param == "max_new_tokens"
    assert "MAX_BATCH_TOKENS" in caught.value.message
    assert "100" in caught.value.message
    # exactly the budget is fine
    result = run(engine.generate(prompt, greedy(engine, 100 - len(prompt.token_ids))))
    assert result.completion_tokens <= 100 - len(prompt.token_ids)


def test_prompt_over_max_input_tokens_is_refused_with_both_numbers(
    tiny_gpt2_dir: Path, make_engine: EngineFactory
) -> None:
    engine = make_engine(tiny_gpt2_dir, max_input_tokens=10)
    prompt = engine.prepare_completion(PROMPTS[4])
    count = len(prompt.token_ids)
    assert count > 10
    with pytest.raises(PromptTooLongError) as caught:
        run(engine.generate(prompt, greedy(engine, 5)))
    assert caught.value.prompt_tokens == count
    assert caught.value.limit == 10
    assert f"{count} tokens" in caught.value.message
    assert "limit of 10 tokens" in caught.value.message
    assert caught.value.param == "prompt"
    assert isinstance(caught.value, InvalidRequestError)
    # ten tokens exactly are accepted
    run(engine.generate(PreparedPrompt(prompt.token_ids[:10]), greedy(engine, 2)))


def test_prompt_plus_new_tokens_over_the_context_length_is_refused(gpt2_engine: Engine) -> None:
    assert gpt2_engine.context_length == 256
    prompt = gpt2_engine.prepare_completion(PROMPTS[2])
    with pytest.raises(InvalidRequestError) as caught:
        run(gpt2_engine.generate(prompt, greedy(gpt2_engine, 257 - len(prompt.token_ids))))
    assert caught.value.param == "max_new_tokens"
    assert "256" in caught.value.message


def test_context_length_comes_from_the_config(gpt2_engine: Engine, llama_engine: Engine) -> None:
    assert (gpt2_engine.context_length, llama_engine.context_length) == (256, 512)


def test_empty_prompt_is_refused(tiny_engine: Engine) -> None:
    prompt = tiny_engine.prepare_completion("")
    assert prompt.token_ids == []
    with pytest.raises(InvalidRequestError) as caught:
        run(tiny_engine.generate(prompt, greedy(tiny_engine, 5)))
    assert caught.value.param == "prompt"
    assert settles(tiny_engine)


# ----- chat prompts -------------------------------------------------------------------------------------------------

MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_chat_without_a_template_uses_the_transcript(gpt2_engine: Engine) -> None:
    tokenizer = tokenizer_of(gpt2_engine)
    assert not tokenizer.chat_template
    prepared = gpt2_engine.prepare_chat(MESSAGES)
    expected = "System: You are terse.\nUser: What is the capital of France?\nAssistant:"
    assert transcript(MESSAGES) == expected
    assert prepared.token_ids == tokenizer(expected)["input_ids"]
    assert prepared.extra_stops == ("\nUser:",)


def test_chat_without_a_template_stops_at_the_format_stop(gpt2_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transcript's stop strings reach the engine (and join the request's own). The random model never writes
    "\\nUser:", so the format's stop is swapped for a piece of what it does write."""
    monkeypatch.setattr(gpt2_engine, "_eos_ids", set())
    params = greedy(gpt2_engine, 40)
    full = run(gpt2_engine.generate(gpt2_engine.prepare_chat(MESSAGES), params)).text
    start = next(i for i in range(8, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    monkeypatch.setattr(prompts, "TRANSCRIPT_STOPS", (full[start : start + 3],))
    result = run(gpt2_engine.generate(gpt2_engine.prepare_chat(MESSAGES), greedy(gpt2_engine, 40, stop=["@@@"])))
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(full[start : start + 3])]


def test_chat_with_a_template_uses_it(llama_engine: Engine) -> None:
    tokenizer = tokenizer_of(llama_engine)
    prepared = llama_engine.prepare_chat(MESSAGES)
    rendered = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prepared.token_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    templated = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prepared.token_ids == list(templated["input_ids"])
    assert prepared.token_ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # special tokens, not text
    assert prepared.extra_stops == ()
    result = run(llama_engine.generate(prepared, greedy(llama_engine, 10)))
    assert result.prompt_tokens == len(prepared.token_ids)
    assert result.finish_reason in ("length", "eos")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": 3}],
        [{"role": "user"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    ],
)
def test_bad_messages_are_refused(tiny_engine: Engine, messages: list[Any]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        tiny_engine.prepare_chat(messages)
    assert caught.value.param == "messages"


# ----- life cycle and faults ----------------------------------------------------------------------------------------


def test_engine_not_started_is_not_ready(tiny_gpt2_dir: Path, make_settings: Callable[..., Any]) -> None:
    engine = Engine(make_settings(tiny_gpt2_dir))
    assert not engine.ready
    assert engine.state is EngineState.STARTING
    with pytest.raises(NotReadyError, match="not ready"):
        engine.prepare_completion("Hi")
    with pytest.raises(NotReadyError):
        run(engine.generate(PreparedPrompt([1, 2, 3]), SamplingParams(max_new_tokens=2)))
    with pytest.raises(NotReadyError):
        engine.token_pieces([1])

    async def submit() -> None:
        engine.submit(PreparedPrompt([1, 2, 3]), SamplingParams(max_new_tokens=2))

    with pytest.raises(NotReadyError):
        run(submit())


def test_failed_start_reports_why(make_settings: Callable[..., Any]) -> None:
    engine = Engine(make_settings("no-such-org/no-such-model"))
    with pytest.raises(ModelNotFoundError):
        engine.start()
    assert engine.state is EngineState.FAILED
    assert not engine.ready
    assert engine.failure
    assert "no-such-org/no-such-model" in engine.failure
    with pytest.raises(NotReadyError) as caught:
        engine.prepare_completion("Hi")
    assert "no-such-org/no-such-model" in caught.value.message
    assert caught.value.type == "unavailable_error"


def test_shutdown_ends_requests_in_flight(tiny_gpt2_dir: Path, slow_engine: EngineFactory) -> None:
    engine = slow_engine(tiny_gpt2_dir, 0.005)

    async def main() -> None:
        stream = engine.stream(engine.prepare_completion(PROMPTS[2]), greedy(engine, 200))
        await first_chunk(stream)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(NotReadyError, match=r"(?i)shut"):
            async for _ in stream:
                pass

    run(main())
    assert engine.state is EngineState.STOPPED
    assert not engine.ready
    with pytest.raises(NotReadyError):
        engine.prepare_completion("Hi")


def test_a_failing_step_fails_the_batch_and_the_engine_keeps_serving(
    tiny_gpt2_dir: Path, make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_gpt2_dir)
    engine._eos_ids = set()
    patch_forward(monkeypatch, engine, fail_on_call(4))  # the prefill, then decode steps: the third one fails

    async def two() -> list[Any]:
        prepared = [engine.prepare_completion(text) for text in PROMPTS[2:4]]
        return await asyncio.gather(*(engine.generate(p, greedy(engine, 20)) for p in prepared), return_exceptions=True)

    outcomes = run(two(), timeout_s=10)
    assert all(isinstance(outcome, GenerationError) for outcome in outcomes), outcomes
    assert all("boom" not in outcome.message for outcome in outcomes)  # internals are not shown to clients
    assert engine.stats.requests_failed == 2
    assert settles(engine)
    result = run(engine.generate(engine.prepare_completion(PROMPTS[2]), greedy(engine, 20)))
    assert result.completion_tokens == 20
    assert engine.ready


def test_a_failing_prefill_fails_its_requests(
    tiny_gpt2_dir: Path, make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_gpt2_dir)
    patch_forward(monkeypatch, engine, fail_on_call(1))
    with pytest.raises(GenerationError):
        run(engine.generate(engine.prepare_completion("Hi"), greedy(engine, 5)), timeout_s=10)
    assert settles(engine)
    assert run(engine.generate(engine.prepare_completion("Hi"), greedy(engine, 5))).completion_tokens >= 1


def test_a_sampling_fault_at_prefill_fails_its_newcomers_instead_of_losing_them(
    tiny_gpt2_dir: Path, make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_gpt2_dir)
    original = engine_module.sample_next_tokens
    calls = itertools.count(1)

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == 1:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "sample_next_tokens", flaky)

    async def three() -> list[Any]:
        # the first two share one prefill (one prompt length); the third, longer, is prefilled apart
        prepared = [engine.prepare_completion(text) for text in ("Hi", "Hi", "Hi there, how are you")]
        return await asyncio.gather(*(engine.generate(p, greedy(engine, 5)) for p in prepared), return_exceptions=True)

    outcomes = run(three(), timeout_s=10)
    assert all(isinstance(outcome, GenerationError) for outcome in outcomes[:2]), outcomes
    assert isinstance(outcomes[2], GenerationResult)
    assert outcomes[2].completion_tokens >= 1
    assert engine.stats.requests_failed == 2
    assert settles(engine)
    assert run(engine.generate(engine.prepare_completion("Hi"), greedy(engine, 5))).completion_tokens >= 1


def test_prefill_token_cap_spreads_a_crowd_over_several_prefills(
    tiny_gpt2_dir: Path, make_engine: EngineFactory, gpt2_engine: Engine
) -> None:
    engine = make_engine(tiny_gpt2_dir, max_prefill_tokens=16, batch_wait_ms=50)
    prepared = [engine.prepare_completion(text) for text in PROMPTS[2:6]]
    assert 2 * min(len(p.token_ids) for p in prepared) > 16  # no two of them fit one 16-token prefill
    params = greedy(engine, 12)

    async def together() -> list[GenerationResult]:
        return await asyncio.gather(*(engine.generate(p, params) for p in prepared))

    results = run(together())
    assert engine.stats.prefills >= 4
    assert engine.stats.largest_batch >= 2  # yet they still decode together
    assert [r.text for r in results] == [run(gpt2_engine.generate(p, params)).text for p in prepared]


# ----- the admission policy, as a plain function ----------------------------------------------------------------------


def queued(prompt_tokens: int, max_new_tokens: int) -> Sequence:
    return Sequence(
        "r", "-", [1] * prompt_tokens, SamplingParams(max_new_tokens=max_new_tokens), lambda event: None, 0.0, 1.0
    )


def test_admission_fills_free_rows_in_queue_order(tiny_gpt2_dir: Path, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(tiny_gpt2_dir, max_batch_size=4, max_batch_tokens=10_000, max_prefill_tokens=1024)
    waiting = [queued(10, 10) for _ in range(6)]
    assert admission_count(waiting, [], settings) == 4
    assert admission_count(waiting, [queued(10, 10)] * 3, settings) == 1
    assert admission_count(waiting, [queued(10, 10)] * 4, settings) == 0
    assert admission_count([], [], settings) == 0


def test_admission_budgets_rows_times_the_widest_row(
    tiny_gpt2_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(tiny_gpt2_dir, max_batch_size=8, max_batch_tokens=200, max_prefill_tokens=1024)
    # each needs 50 slots: four rows of 50 fit 200, a fifth does not
    assert admission_count([queued(10, 40)] * 6, [], settings) == 4
    # one wide running row (100) makes every row count as 100: only one more fits
    assert admission_count([queued(10, 40)] * 6, [queued(60, 40)], settings) == 1
    # a wide newcomer at the front that does not fit holds back the narrow ones behind it (first come, first served)
    assert admission_count([queued(60, 40), queued(5, 5)], [queued(10, 40)] * 2, settings) == 0


def test_admission_caps_prompt_tokens_per_prefill_but_always_takes_one(
    tiny_gpt2_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(tiny_gpt2_dir, max_batch_size=8, max_batch_tokens=100_000, max_prefill_tokens=30)
    assert admission_count([queued(10, 5)] * 5, [], settings) == 3
    assert admission_count([queued(40, 5)] * 3, [], settings) == 1  # over the cap alone, yet it must run some time


def test_lean_forward_false_serves_transformers_forward_and_says_so(
    tiny_llama_dir: Path, make_engine: EngineFactory
) -> None:
    lean = make_engine(tiny_llama_dir)
    plain = make_engine(tiny_llama_dir, lean_forward=False)
    assert (lean.info().forward, plain.info().forward) == ("lean", "transformers")
    texts = [
        run(engine.generate(engine.prepare_completion("The quick brown fox"), greedy(engine, 8))).text
        for engine in (lean, plain)
    ]
    assert texts[0] == texts[1]
