"""The real default model (SmolLM2-135M-Instruct, from the bundled package or MODEL_ID): answers, determinism, batching.

Slow (model load ~5 s, ~10 tokens/s on a 2-core CPU; a first run also converts the bundled model, ~1 min): deselect
with `-m "not real_model"`. Uses the default Settings, so MODEL_ID and MODEL_CACHE_DIR come from the environment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import torch
from transformers import AutoModelForCausalLM

from inference.client import GenerationResult, TextChunk
from inference.engine import Engine
from inference.fast_llama import LlamaDecoder
from inference.loader import bundled_package_available
from inference.params import SamplingParams, build_sampling_params
from inference.quantization import fbgemm_available, int4_available
from inference.settings import DEFAULT_MODEL_ID, Settings
from tests.test_fast_llama import assert_rows_decode_as_alone

pytestmark = pytest.mark.real_model

T = TypeVar("T")
NEW_TOKENS = 24


def run(coroutine: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout_s)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """The default settings, as `make run` serves them."""
    yield from started(Settings())


def started(settings: Settings) -> Iterator[Engine]:
    engine = Engine(settings)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def float32_engine() -> Iterator[Engine]:
    yield from started(Settings(quantization="none"))


@pytest.fixture(scope="module")
def int8_engine() -> Iterator[Engine]:
    if not fbgemm_available():
        pytest.skip("int8 needs fbgemm (an x86 CPU with AVX2)")
    yield from started(Settings(quantization="int8"))


@pytest.fixture(scope="module")
def int4_engine() -> Iterator[Engine]:
    if not (fbgemm_available() and int4_available()):
        pytest.skip("int4 needs torch's CPU int4 matmul, and fbgemm for the LM head (an x86 CPU with AVX2)")
    yield from started(Settings(quantization="int4"))


def greedy(engine: Engine, max_new_tokens: int = NEW_TOKENS) -> SamplingParams:
    return build_sampling_params(engine.settings, temperature=0.0, max_new_tokens=max_new_tokens)


def test_loads_the_default_model(engine: Engine) -> None:
    assert engine.ready
    assert engine.loaded is not None
    if engine.settings.model_id == DEFAULT_MODEL_ID and bundled_package_available():
        assert engine.loaded.source == "package"
    assert engine.loaded.tokenizer.chat_template
    assert engine.context_length >= 2048


def test_chat_answers_the_capital_of_france(engine: Engine) -> None:
    prompt = engine.prepare_chat([{"role": "user", "content": "What is the capital of France?"}])
    result = run(engine.generate(prompt, greedy(engine)))
    assert "Paris" in result.text, result.text
    assert result.finish_reason in ("length", "eos")
    assert "<|im_end|>" not in result.text
    assert "<|im_start|>" not in result.text


@pytest.mark.parametrize("engine_name", ["engine", "float32_engine"])
def test_chat_prompts_reuse_the_template_opening(engine_name: str, request: pytest.FixtureRequest) -> None:
    """SmolLM2's template opens every chat with its system prompt: prefilled once at start-up, reused by each chat
    prompt, and the logits after it are those of a full prefill (to float rounding; formats that round activations to
    bfloat16 or int8 turn its last bits into a few hundredths of a logit)."""
    engine: Engine = request.getfixturevalue(engine_name)
    assert engine.loaded is not None
    rounded = engine.loaded.weights.format in ("int4", "int8")
    tolerance = 0.5 if rounded else 1e-3
    prompts = [
        engine.prepare_chat([{"role": "user", "content": text}]).token_ids
        for text in ("Write a short story about a lighthouse keeper.", "What is 2+2?")
    ]
    prefix = engine.prefixes.longest_opening(prompts[0])
    assert prefix is not None
    opening = engine.loaded.tokenizer.decode(list(prefix.tokens))
    assert opening.startswith("<|im_start|>system\n"), opening
    assert opening.endswith("<|im_start|>user\n"), opening
    for prompt in prompts:
        _, full = engine.loaded.decoder.prefill([prompt])
        _, reused = engine.loaded.decoder.prefill([prompt], prefix)
        torch.testing.assert_close(reused, full, rtol=tolerance, atol=tolerance)
        assert int(reused.argmax()) == int(full.argmax())
    before = engine.stats.prefix_tokens_reused
    run(engine.generate(engine.prepare_chat([{"role": "user", "content": "Hi"}]), greedy(engine, 4)))
    assert engine.stats.prefix_tokens_reused == before + len(prefix)


def test_auto_serves_smaller_weights_that_pass_the_quality_check(engine: Engine) -> None:
    """On an x86 CPU, QUANTIZATION=auto serves the smallest format that passes the check against float32 (perplexity
    within 3%, the likeliest token kept at 98% of positions): for SmolLM2, whose layers ship as 4-bit, int4 on our
    kernel, which keeps the likeliest token everywhere on the check's text."""
    assert engine.loaded is not None
    weights = engine.loaded.weights
    if not fbgemm_available():
        assert weights.format == "none"
        return
    assert weights.format == "int4", weights.reason
    assert "our AVX2 kernel" in weights.reason
    assert engine.info().kv_cache_dtype == "float16"  # decoded with our attention kernel
    assert weights.quality is not None
    assert weights.quality.passes
    assert weights.quality.top1_agreement >= 0.995, weights.quality


def test_int4_passes_the_quality_check(int4_engine: Engine) -> None:
    """SmolLM2's layers ship as Q4_1, which int4 recovers: only activations are rounded (to 16 bits on our kernel,
    to bfloat16 on torch's)."""
    assert int4_engine.loaded is not None
    quality = int4_engine.loaded.weights.quality
    assert quality is not None
    assert quality.passes, quality


def test_int8_keeps_perplexity_within_3_percent(int8_engine: Engine) -> None:
    assert int8_engine.loaded is not None
    quality = int8_engine.loaded.weights.quality
    assert quality is not None
    assert quality.perplexity_increase <= 0.03, quality


def test_greedy_completion_is_deterministic_and_matches_transformers(float32_engine: Engine) -> None:
    engine = float32_engine
    assert engine.loaded is not None
    prompt = engine.prepare_completion("The three primary colors are")
    first = run(engine.generate(prompt, greedy(engine)))
    second = run(engine.generate(prompt, greedy(engine)))
    assert first.text == second.text
    assert first.text.strip()
    # transformers' own greedy search on the same weights gives the same text
    model = AutoModelForCausalLM.from_pretrained(engine.loaded.location, dtype=torch.float32)
    tokenizer = engine.loaded.tokenizer
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt.token_ids]),
            attention_mask=torch.ones((1, len(prompt.token_ids)), dtype=torch.long),
            max_new_tokens=first.completion_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = output[0, len(prompt.token_ids) :].tolist()
    assert tokenizer.decode(new_tokens, skip_special_tokens=True) == first.text


def test_prompt_logprobs_match_transformers_in_float32(float32_engine: Engine) -> None:
    """What `echo` + `logprobs` (lm-evaluation-harness's scoring) returns, against transformers' own forward pass."""
    engine = float32_engine
    assert engine.loaded is not None
    prompt = engine.prepare_completion("The capital of France is Paris, and the capital of Italy is Rome.")
    params = SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=True, top_logprobs=1, prompt_logprobs=1)
    result = run(engine.generate(prompt, params))
    model = AutoModelForCausalLM.from_pretrained(engine.loaded.location, dtype=torch.float32)
    ids = prompt.token_ids
    with torch.inference_mode():
        expected = model(torch.tensor([ids + list(result.token_ids)])).logits[0].float().log_softmax(-1)
    assert result.prompt_logprobs[0] is None
    for position in range(1, len(ids)):
        score = result.prompt_logprobs[position]
        assert score is not None
        assert abs(score.logprob - float(expected[position - 1, ids[position]])) < 1e-4, position
        assert score.top[0][0] == int(expected[position - 1].argmax())
    assert abs(result.logprobs[0] - float(expected[len(ids) - 1, result.token_ids[0]])) < 1e-4


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    prompt = engine.prepare_completion("Once upon a time")

    def sample(seed: int) -> str:
        params = build_sampling_params(
            engine.settings, temperature=0.9, top_p=0.95, top_k=50, seed=seed, max_new_tokens=16
        )
        return run(engine.generate(prompt, params)).text

    first = sample(123)
    assert sample(123) == first
    assert sample(456) != first


@pytest.mark.parametrize("engine_name", ["engine", "int4_engine"])
def test_rows_of_one_length_keep_their_logits_bit_for_bit(engine_name: str, request: pytest.FixtureRequest) -> None:
    """SmolLM2's rows decoded together in one unpadded batch give the logits they give alone, bit for bit. Its
    shapes matter: a fused attention kernel (scaled_dot_product_attention) tried for the decode step passed on the
    tiny model but changed the last bits of every row here (0 of 8 rows identical in float16)."""
    engine: Engine = request.getfixturevalue(engine_name)
    assert engine.loaded is not None
    decoder = engine.loaded.decoder
    assert isinstance(decoder, LlamaDecoder)
    prompts = [[1 + (row * 7 + position) % 1000 for position in range(40)] for row in range(8)]
    assert_rows_decode_as_alone(decoder, prompts)


@pytest.mark.parametrize("engine_name", ["engine", "float32_engine", "int8_engine", "int4_engine"])
def test_batched_greedy_equals_alone(engine_name: str, request: pytest.FixtureRequest) -> None:
    """Alone and in a batch, the same text, in every weight format (int8 scales its activations per row)."""
    engine: Engine = request.getfixturevalue(engine_name)
    texts = [
        "The capital of Italy is",
        "def fibonacci(n):",
        "Water boils at a temperature of",
        "A haiku about autumn leaves:\n",
    ]
    prepared = [engine.prepare_completion(text) for text in texts]
    params = greedy(engine, 16)
    alone = [run(engine.generate(p, params)).text for p in prepared]

    async def together() -> list[GenerationResult]:
        return await asyncio.gather(*(engine.generate(p, params) for p in prepared))

    sizes_before = engine.stats.batch_sizes_seen.copy()
    batched = run(together())
    assert [result.text for result in batched] == alone
    assert max(engine.stats.batch_sizes_seen - sizes_before) >= 3  # they really shared decode steps


def test_stream_chunks_join_to_the_final_text(engine: Engine) -> None:
    prompt = engine.prepare_chat([{"role": "user", "content": "Name three fruits."}])

    async def collect() -> tuple[list[str], GenerationResult]:
        chunks: list[str] = []
        async for event in engine.stream(prompt, greedy(engine)):
            if isinstance(event, TextChunk):
                chunks.append(event.text)
            else:
                return chunks, event
        raise AssertionError("no result")

    chunks, result = run(collect())
    assert len(chunks) > 1
    assert "".join(chunks) == result.text
    assert result.text.strip()
