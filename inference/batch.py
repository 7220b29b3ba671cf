"""The running batch: left-padded rows that share one KV cache, grown by prefill and merge, shrunk by filter.

This is TGI's `CausalLMBatch` idea for plain transformers models: new rows are prefilled on their own, then their
cache is padded on the left and concatenated to the running one; finished rows are selected out and the columns
that only held padding are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel


@dataclass
class BatchState:
    """Tensors of a running batch; row i of each belongs to the i-th sequence the engine tracks."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [rows, cached columns]; 0 marks left padding
    next_positions: torch.Tensor  # [rows, 1]; position id of each row's next input token
    next_tokens: torch.Tensor  # [rows, 1]; each row's newest token, not yet in the cache

    @property
    def size(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def columns(self) -> int:
        return int(self.attention_mask.shape[1])


def _cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


@torch.inference_mode()
def prefill(model: PreTrainedModel, prompts: list[list[int]], pad_token_id: int) -> tuple[BatchState, torch.Tensor]:
    """Run the prompts through the model together; return their batch (without next tokens yet) and last logits."""
    device = model.device
    width = max(len(ids) for ids in prompts)
    # 1. left-pad the prompts into one matrix, with a mask of the real tokens
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # 2. positions count real tokens only, so a padded row sees the same positions as it would alone
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # 3. one forward pass fills the cache; only the last position's logits are needed
    cache = DynamicCache()
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_positions = attention_mask.sum(-1, keepdim=True)
    placeholder = torch.zeros_like(next_positions)
    state = BatchState(output.cache, attention_mask, next_positions, placeholder)
    return state, output.logits[:, -1, :]


@torch.inference_mode()
def decode_step(model: PreTrainedModel, state: BatchState) -> torch.Tensor:
    """Feed every row's newest token; return the logits for the token after it."""
    # 1. the new column is real for every row
    state.attention_mask = F.pad(state.attention_mask, (0, 1), value=1)
    # 2. one forward pass over a single new position per row, reusing the cache
    output = model(
        input_ids=state.next_tokens,
        attention_mask=state.attention_mask,
        position_ids=state.next_positions,
        cache=state.cache,
        use_cache=True,
    )
    state.cache = output.cache
    state.next_positions = state.next_positions + 1
    logits: torch.Tensor = output.logits[:, -1, :]
    return logits


def _pad_left(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    missing = columns - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge(left: BatchState, right: BatchState) -> BatchState:
    """Stack two batches into one, padding the narrower one's cache and mask on the left."""
    columns = max(left.columns, right.columns)
    layers = [
        (
            torch.cat([_pad_left(k1, columns, 2), _pad_left(k2, columns, 2)]),
            torch.cat([_pad_left(v1, columns, 2), _pad_left(v2, columns, 2)]),
        )
        for (k1, v1), (k2, v2) in zip(_cache_tensors(left.cache), _cache_tensors(right.cache), strict=True)
    ]
    return BatchState(
        cache=DynamicCache(ddp_cache_data=layers),
        attention_mask=torch.cat(
            [_pad_left(left.attention_mask, columns, 1), _pad_left(right.attention_mask, columns, 1)]
        ),
        next_positions=torch.cat([left.next_positions, right.next_positions]),
        next_tokens=torch.cat([left.next_tokens, right.next_tokens]),
    )


def select(state: BatchState, keep: list[int]) -> BatchState:
    """Keep only the given rows, and drop leading columns that are padding in all of them."""
    index = torch.tensor(keep, dtype=torch.long, device=state.attention_mask.device)
    mask = state.attention_mask.index_select(0, index)
    first_real = int((mask.sum(0) > 0).nonzero()[0]) if mask.numel() else 0
    layers = [
        (k.index_select(0, index)[:, :, first_real:], v.index_select(0, index)[:, :, first_real:])
        for k, v in _cache_tensors(state.cache)
    ]
    return BatchState(
        cache=DynamicCache(ddp_cache_data=layers),
        attention_mask=mask[:, first_real:],
        next_positions=state.next_positions.index_select(0, index),
        next_tokens=state.next_tokens.index_select(0, index),
    )


def supports_merging(cache: DynamicCache) -> bool:
    """Only full-attention dynamic layers can be padded and stacked like this (not sliding-window or linear ones)."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)
