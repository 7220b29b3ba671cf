"""The running batch: left-padded rows sharing one KV cache; rows join after their prefill and leave when done.

This is TGI's `CausalLMBatch` idea for plain transformers models (prefill newcomers on their own, then stack them
onto the running rows; filter finished rows out), with a slot cache (kv_cache.py) so that joining and leaving cost
one row's copy instead of the whole cache's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from inference.decoders import Decoder
from inference.kv_cache import SlotCache
from inference.prefix_cache import CachedPrefix


@dataclass
class Prefilled:
    """Newcomers after their prefill: their own cache, mask and positions, ready to join the running batch."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [rows, prompt columns], all ones (the running batch pads it when it joins)
    next_positions: torch.Tensor  # [rows, 1]
    cache_dtype: torch.dtype | None = None  # what the running batch keeps their keys and values in (None: as is)


def prefill(
    decoder: Decoder, prompts: list[list[int]], prefix: CachedPrefix | None = None
) -> tuple[Prefilled, torch.Tensor]:
    """Run prompts of one length through the model together; return their cache and each last position's logits.

    Same-length prompts need no padding, so each row computes exactly what it would alone (padding shifts the
    attention's sums and, in bfloat16, changed the logits by up to 0.4); the engine groups its newcomers that way,
    and by the cached `prefix` they all open with, if any (only the tokens after it are computed).
    """
    width = len(prompts[0])
    if any(len(ids) != width for ids in prompts):
        raise ValueError("prefill takes prompts of one length")
    if prefix is not None and not all(prefix.opens(ids) for ids in prompts):
        raise ValueError("every prompt must open with the prefix")
    cache, logits = decoder.prefill(prompts, prefix)
    attention_mask = torch.ones((len(prompts), width), dtype=torch.long, device=logits.device)
    next_positions = torch.full((len(prompts), 1), width, dtype=torch.long, device=logits.device)
    return Prefilled(cache, attention_mask, next_positions, decoder.cache_dtype), logits


class RunningBatch:
    """Rows decoding together. Row i of every tensor here belongs to the i-th sequence the engine tracks."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.cache: SlotCache | None = None
        self.attention_mask = torch.zeros((0, 0), dtype=torch.long)
        self.next_positions = torch.zeros((0, 1), dtype=torch.long)
        self.next_tokens = torch.zeros((0, 1), dtype=torch.long)

    @property
    def size(self) -> int:
        return int(self.attention_mask.shape[0])

    # add/remove write into the cache's buffers in place, and `step` may have reallocated those under inference mode
    # (they are inference tensors then): writing them outside it raises, so these run in inference mode too.
    @torch.inference_mode()
    def add(self, newcomers: Prefilled, next_tokens: torch.Tensor) -> None:
        """Stack prefilled rows under the running ones, padding whichever is narrower on the left."""
        if self.cache is None or self.size == 0:
            # an idle batch starts afresh, so buffers left from a busier time are freed
            self.cache = SlotCache(newcomers.cache, self.max_rows, newcomers.cache_dtype)
            self.cache.add_rows(newcomers.cache)
            self.attention_mask = newcomers.attention_mask
            self.next_positions = newcomers.next_positions
            self.next_tokens = next_tokens
            return
        self.cache.add_rows(newcomers.cache)
        columns = self.cache.columns
        self.attention_mask = torch.cat(
            [_pad_left(self.attention_mask, columns), _pad_left(newcomers.attention_mask, columns)]
        )
        self.next_positions = torch.cat([self.next_positions, newcomers.next_positions])
        self.next_tokens = torch.cat([self.next_tokens, next_tokens])

    @torch.inference_mode()
    def remove(self, leaving: list[int]) -> list[int]:
        """Drop finished rows; returns, for each remaining row in its new place, its old index."""
        assert self.cache is not None
        order = self.cache.remove_rows(leaving)
        index = torch.tensor(order, dtype=torch.long, device=self.attention_mask.device)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.next_positions = self.next_positions.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)
        # columns that are padding in every remaining row can go
        real = (self.attention_mask.sum(0) > 0).nonzero()
        padding_only = int(real[0]) if real.numel() else self.attention_mask.shape[1]
        if padding_only:
            self.cache.drop_leading_columns(padding_only)
            self.attention_mask = self.attention_mask[:, padding_only:]
        return order

    @torch.inference_mode()
    def step(self, decoder: Decoder) -> torch.Tensor:
        """Feed every row's newest token; return the logits for the token after it."""
        assert self.cache is not None
        # 1. make room for one more column, which is real for every row
        self.cache.reserve_columns(1)
        self.attention_mask = F.pad(self.attention_mask, (0, 1), value=1)
        # 2. one forward pass over a single new position per row, writing into the cache in place
        logits = decoder.decode(self.cache, self.next_tokens, self.next_positions, self.attention_mask)
        self.next_positions = self.next_positions + 1
        return logits


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    return F.pad(tensor, (columns - tensor.shape[1], 0), value=0)


def supports_slot_cache(cache: DynamicCache) -> bool:
    """Only full-attention dynamic layers can be handled like this (not sliding-window or linear-attention ones)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)
