"""A lean forward pass for Llama-architecture models (SmolLM2, TinyLlama, Llama 2/3), for the engine's decode step.

transformers' forward is general (masks, cache classes, hooks, output objects), and at batch 1 on a CPU that
generality costs as much as the arithmetic. This one does only what a decode step needs, from the same weights:
fused q/k/v and gate/up projections (one matrix product each instead of three and two), the 1/sqrt(head_dim)
attention scale folded into the query weights, rotary embeddings as one small matrix per row built once per step
and shared by every layer, grouped-query attention without repeating keys, and keys/values written straight into
the engine's slot cache. Models it does not support keep transformers' forward (batch.HFDecoder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from inference.kv_cache import SlotCache

# Makes a linear layer from (weight [out, in], bias or None, name); the quantization mode decides its kind.
LinearFactory = Callable[[torch.Tensor, torch.Tensor | None, str], nn.Module]


class FloatLinear(nn.Module):
    """A float32 linear layer over given weights (nn.Linear would first fill fresh ones at random)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> nn.Module:
    return FloatLinear(weight, bias)


def supports(model: PreTrainedModel) -> bool:
    """Llama-architecture models whose forward this module reproduces exactly."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    return (
        config.model_type == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "") == "silu"
        and rope.get("rope_type", "default") != "dynamic"  # its frequencies change with the sequence length
    )


@dataclass
class _Layer:
    attention_norm: torch.Tensor
    qkv: nn.Module
    out: nn.Module
    mlp_norm: torch.Tensor
    gate_up: nn.Module
    down: nn.Module


class LlamaDecoder:
    """Prefill and decode for a Llama model; `linear` decides how the projections are stored (float32, int8...).
    It copies what it needs, so the transformers model may be dropped once it is built."""

    def __init__(
        self, model: PreTrainedModel, linear: LinearFactory = plain_linear, embedding_dtype: torch.dtype | None = None
    ) -> None:
        config: Any = model.config
        inner: Any = model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.groups = self.heads // self.kv_heads
        self.eps = config.rms_norm_eps
        self.device = model.device
        self.layers = [self._layer(index, layer, linear) for index, layer in enumerate(inner.layers)]
        self.final_norm = inner.norm.weight.detach().float()
        self.lm_head = linear(model.lm_head.weight, None, "lm_head")
        # looked up a few rows a step, so it may be stored smaller (float16 halves it) and widened as rows are read
        self.embedding = inner.embed_tokens.weight.detach().to(embedding_dtype or torch.float32)
        # cos/sin of every position once (a few MB), from the model's own rotary module: any rope scaling it applies
        positions = torch.arange(config.max_position_embeddings, device=self.device).unsqueeze(0)
        cos, sin = inner.rotary_emb(self.embedding[:1].float(), positions)
        self.cos, self.sin = cos[0].float(), sin[0].float()
        # rotate_half(x) == x @ rotation: rope(x) = x * cos + (x @ rotation) * sin
        half = self.head_dim // 2
        self.rotation = torch.zeros(self.head_dim, self.head_dim, device=self.device)
        self.rotation[torch.arange(half) + half, torch.arange(half)] = -1.0
        self.rotation[torch.arange(half), torch.arange(half) + half] = 1.0

    def _layer(self, index: int, layer: Any, linear: LinearFactory) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        # the attention scale goes into the query weights, so no step multiplies the scores by it
        query = attention.q_proj.weight.detach().float() * self.head_dim**-0.5
        qkv = torch.cat([query, attention.k_proj.weight.detach().float(), attention.v_proj.weight.detach().float()])
        gate_up = torch.cat([mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float()])
        return _Layer(
            attention_norm=layer.input_layernorm.weight.detach().float(),
            qkv=linear(qkv, None, f"model.layers.{index}.self_attn.q_proj"),
            out=linear(attention.o_proj.weight, None, f"model.layers.{index}.self_attn.o_proj"),
            mlp_norm=layer.post_attention_layernorm.weight.detach().float(),
            gate_up=linear(gate_up, None, f"model.layers.{index}.mlp.gate_proj"),
            down=linear(mlp.down_proj.weight, None, f"model.layers.{index}.mlp.down_proj"),
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # as transformers' LlamaRMSNorm computes it, so float32 results match it exactly
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _mlp(self, layer: _Layer, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up(self._norm(hidden, layer.mlp_norm)).chunk(2, dim=-1)
        output: torch.Tensor = hidden + layer.down(F.silu(gate) * up)
        return output

    # ----- prefill: prompts of one length, a fresh cache ---------------------------------------------------------

    def _prompt_forward(self, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Every position's last hidden state for same-length prompts [rows, width], filling `cache`."""
        rows, width = input_ids.shape
        # 1. token embeddings, and each position's rotary factors
        hidden = self.embedding[input_ids].float()
        cos, sin = self.cos[:width].unsqueeze(1), self.sin[:width].unsqueeze(1)  # [width, 1, head_dim]
        for index, layer in enumerate(self.layers):
            # 2. attention: project, rotate queries and keys, cache keys and values, attend causally
            qkv = layer.qkv(self._norm(hidden, layer.attention_norm))
            qkv = qkv.view(rows, width, self.heads + 2 * self.kv_heads, self.head_dim)
            qk = qkv[:, :, : self.heads + self.kv_heads]
            qk = qk * cos + (qk @ self.rotation) * sin
            query = qk[:, :, : self.heads].transpose(1, 2)
            keys, values = cache.update(
                qk[:, :, self.heads :].transpose(1, 2), qkv[:, :, self.heads + self.kv_heads :].transpose(1, 2), index
            )
            attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=1.0, enable_gqa=True)
            hidden = hidden + layer.out(attended.transpose(1, 2).reshape(rows, width, -1))
            # 3. the feed-forward block
            hidden = self._mlp(layer, hidden)
        return self._norm(hidden, self.final_norm)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[DynamicCache, torch.Tensor]:
        """Run same-length prompts through the model; return their cache and the last position's logits."""
        cache = DynamicCache()
        hidden = self._prompt_forward(torch.tensor(prompts, dtype=torch.long, device=self.device), cache)
        logits: torch.Tensor = self.lm_head(hidden[:, -1])
        return cache, logits

    @torch.inference_mode()
    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits for token_ids [1, n] (the quality check's perplexity)."""
        logits: torch.Tensor = self.lm_head(self._prompt_forward(token_ids.to(self.device), DynamicCache()))
        return logits

    # ----- decode: one new token per row of the running batch ----------------------------------------------------

    @torch.inference_mode()
    def decode(
        self, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Feed each row's newest token ([rows, 1]) at its position; `attention_mask` [rows, columns] marks the
        cache's real columns (the new one included, whose slot `cache.reserve_columns(1)` made). Returns logits."""
        rows = tokens.shape[0]
        # 1. embeddings, one rotation matrix per row for all layers, and -inf over each row's left padding
        hidden = self.embedding[tokens[:, 0]].float()
        position = positions[:, 0]
        rotary = torch.diag_embed(self.cos[position]) + self.rotation * self.sin[position].unsqueeze(1)
        padding = torch.zeros(attention_mask.shape, device=self.device).masked_fill_(attention_mask == 0, -torch.inf)
        padding = padding[:, None, None, :]
        qk_width = (self.heads + self.kv_heads) * self.head_dim
        for cache_layer, layer in zip(cache.slot_layers(), self.layers, strict=True):
            # 2. project; rotate queries and keys together; write this column of keys and values into the cache
            qkv = layer.qkv(self._norm(hidden, layer.attention_norm))
            qk = torch.bmm(qkv[:, :qk_width].view(rows, -1, self.head_dim), rotary)
            keys, values = cache_layer.update(
                qk[:, self.heads :].unsqueeze(2), qkv[:, qk_width:].view(rows, self.kv_heads, 1, self.head_dim)
            )
            # 3. attention: each key/value head serves `groups` query heads, no copies of keys
            scores = torch.matmul(qk[:, : self.heads].view(rows, self.kv_heads, self.groups, -1), keys.transpose(2, 3))
            attended = torch.matmul((scores + padding).softmax(-1), values)
            hidden = hidden + layer.out(attended.view(rows, -1))
            # 4. the feed-forward block
            hidden = self._mlp(layer, hidden)
        # 5. logits for the next token
        logits: torch.Tensor = self.lm_head(self._norm(hidden, self.final_norm))
        return logits
