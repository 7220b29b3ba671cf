"""Keys and values of prompt openings many requests share, computed once and reused by every prefill that starts so.

Every chat request to an instruct model opens with the same tokens: the chat template's system prompt and the header
of the first user turn (21 of a typical 39-token SmolLM2 chat prompt). At 16 clients a third of the scheduler's
time went to prefilling them again and again (docs/benchmarks.md). A prefill whose prompts start with a stored
prefix copies its keys and values and computes only the rest; the rows then hold exactly the cache a full prefill
would have built, up to float rounding, and each row still computes the same whether alone or batched.

vLLM and SGLang find shared prefixes by hashing blocks of every prompt; this keeps the few openings known ahead
(the template's, found at start-up), which is where the shared tokens of a chat load are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

# An opening shorter than this saves less than the copying and masking it costs.
MIN_PREFIX_TOKENS = 8


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: it holds tensors
class CachedPrefix:
    """An opening's token ids and, per layer, its keys and values ([1, kv heads, tokens, head dim])."""

    tokens: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @classmethod
    def from_cache(cls, tokens: list[int], cache: DynamicCache) -> CachedPrefix:
        """The opening as a prefill of `tokens` alone left it in `cache`."""
        layers: list[Any] = list(cache.layers)  # full-attention layers: the engine refuses other kinds at start-up
        keys = tuple(layer.keys[:1, :, : len(tokens)].clone() for layer in layers)
        values = tuple(layer.values[:1, :, : len(tokens)].clone() for layer in layers)
        return cls(tuple(tokens), keys, values)

    def __len__(self) -> int:
        return len(self.tokens)

    def opens(self, prompt: list[int]) -> bool:
        """Whether `prompt` starts with this opening and goes on past it (its last token must still be computed)."""
        return len(prompt) > len(self.tokens) and tuple(prompt[: len(self.tokens)]) == self.tokens

    def cache_for(self, rows: int) -> DynamicCache:
        """A fresh cache holding this opening in each of `rows` rows, for a prefill to append the rest to."""
        cache = DynamicCache()
        for index, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            cache.update(keys.expand(rows, -1, -1, -1).clone(), values.expand(rows, -1, -1, -1).clone(), index)
        return cache


def prefill_start(prefix: CachedPrefix | None, prompts: list[list[int]]) -> tuple[int, DynamicCache, list[list[int]]]:
    """Where a prefill of `prompts` begins: how many tokens its cache already holds (the prefix's), that cache, and
    each prompt's tokens still to compute."""
    if prefix is None:
        return 0, DynamicCache(), prompts
    return len(prefix), prefix.cache_for(len(prompts)), [prompt[len(prefix) :] for prompt in prompts]


class PrefixStore:
    """The openings kept, longest match first."""

    def __init__(self) -> None:
        self._prefixes: list[CachedPrefix] = []

    def add(self, prefix: CachedPrefix) -> None:
        self._prefixes = sorted([*self._prefixes, prefix], key=len, reverse=True)

    def longest_opening(self, prompt: list[int]) -> CachedPrefix | None:
        return next((prefix for prefix in self._prefixes if prefix.opens(prompt)), None)


def common_opening(token_lists: list[list[int]]) -> list[int]:
    """The longest run of tokens every list starts with."""
    opening: list[int] = []
    for column in zip(*token_lists, strict=False):
        if any(token != column[0] for token in column):
            break
        opening.append(column[0])
    return opening
