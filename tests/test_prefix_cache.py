"""A cached prompt opening: a prefill that reuses it builds the cache and logits a full prefill builds, and the
engine finds the opening, reuses it, and answers exactly as without it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from inference.decoders import Decoder, TransformersDecoder
from inference.engine import Engine
from inference.fast_llama import LlamaDecoder
from inference.prefix_cache import CachedPrefix, PrefixStore, common_opening
from inference.prompts import PreparedPrompt, PromptFormatter
from tests.test_engine import greedy, run

OPENING = [11, 12, 13, 14, 15, 16, 17, 18, 19]
# Two prompts of one length that open with OPENING, and one that doesn't.
PROMPTS = [[*OPENING, 30, 31, 32], [*OPENING, 40, 41, 42]]
OTHER = [11, 12, 13, 99, 15, 16, 17, 18, 19, 30, 31, 32]


def decoders(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> dict[str, Callable[[], Decoder]]:
    def load(folder: Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    return {
        "lean-torchscript": lambda: LlamaDecoder(load(tiny_llama_dir), compiled=True),
        "lean-eager": lambda: LlamaDecoder(load(tiny_llama_dir), compiled=False),
        "transformers-llama": lambda: TransformersDecoder(load(tiny_llama_dir)),
        "transformers-gpt2": lambda: TransformersDecoder(load(tiny_gpt2_dir)),
    }


def layer_tensors(cache: DynamicCache) -> list[torch.Tensor]:
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]  # type: ignore[misc]


@pytest.mark.parametrize("kind", ["lean-torchscript", "lean-eager", "transformers-llama", "transformers-gpt2"])
def test_prefill_after_a_cached_opening_builds_what_a_full_prefill_builds(
    kind: str, tiny_llama_dir: Path, tiny_gpt2_dir: Path
) -> None:
    decoder = decoders(tiny_llama_dir, tiny_gpt2_dir)[kind]()
    opening_cache, _ = decoder.prefill([OPENING])
    prefix = CachedPrefix.from_cache(OPENING, opening_cache)
    full_cache, full_logits = decoder.prefill(PROMPTS)
    cache, logits = decoder.prefill(PROMPTS, prefix)
    torch.testing.assert_close(logits, full_logits, rtol=1e-5, atol=1e-5)
    for tensor, expected in zip(layer_tensors(cache), layer_tensors(full_cache), strict=True):
        assert tensor.shape == expected.shape  # the opening's columns, then the rest: the whole prompt
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-5)
    # the stored opening was copied, not shared: the prefill above wrote nothing into it
    again, _ = decoder.prefill([OPENING])
    stored = [tensor for pair in zip(prefix.keys, prefix.values, strict=True) for tensor in pair]
    for tensor, expected in zip(stored, layer_tensors(again), strict=True):
        torch.testing.assert_close(tensor, expected)


def test_store_finds_the_longest_opening_and_only_a_proper_one() -> None:
    def prefix(tokens: list[int]) -> CachedPrefix:
        return CachedPrefix(tuple(tokens), (), ())

    store = PrefixStore()
    short, long = prefix(OPENING[:4]), prefix(OPENING)
    store.add(short)
    store.add(long)
    assert store.longest_opening(PROMPTS[0]) is long
    assert store.longest_opening([*OPENING[:4], 50, 51]) is short
    assert store.longest_opening(OTHER) is None
    # a prompt that is the opening and nothing more: its last token's logits must still be computed
    assert store.longest_opening(OPENING) is short
    assert store.longest_opening(OPENING[:4]) is None


def test_common_opening() -> None:
    assert common_opening([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert common_opening([[1], [2]]) == []


def test_chat_opening_is_what_every_chat_prompt_starts_with(llama_engine: Engine) -> None:
    assert llama_engine.loaded is not None
    formatter = PromptFormatter(llama_engine.loaded.tokenizer)
    opening = formatter.chat_opening()
    assert opening  # the tiny Llama's ChatML template: `<|im_start|>user\n`
    for content in ["Hello there", "\n\nstarts with blank lines", " a space", "<|im_start|>"]:
        ids = formatter.prepare_chat([{"role": "user", "content": content}]).token_ids
        assert ids[: len(opening)] == opening, content
    assert formatter.tokenizer.decode(opening) == "<|im_start|>user\n"


def test_engine_answers_the_same_with_and_without_a_cached_opening(
    make_engine: Callable[..., Engine], tiny_llama_dir: Path
) -> None:
    plain = make_engine(tiny_llama_dir, prefix_caching=False)
    caching = make_engine(tiny_llama_dir)
    caching.remember_prefix(OPENING)
    prompts = [*PROMPTS, OTHER, [*OPENING, 7], [*OPENING, *range(40, 70)]]

    async def answers(engine: Engine) -> list[tuple[str, str]]:
        results = await asyncio.gather(*(engine.generate(PreparedPrompt(ids), greedy(engine, 12)) for ids in prompts))
        return [(result.text, result.finish_reason) for result in results]

    assert run(answers(caching)) == run(answers(plain))
    # every prompt but OTHER opened with the cached tokens and skipped them
    assert caching.stats.prefix_tokens_reused == len(OPENING) * (len(prompts) - 1)
    assert plain.stats.prefix_tokens_reused == 0
