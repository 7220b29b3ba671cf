"""A lean forward pass for Llama-architecture models (SmolLM2, TinyLlama, Llama 2/3), for the engine's decode step.

transformers' forward is general (masks, cache classes, hooks, output objects), and at batch 1 on a CPU that
generality costs as much as the arithmetic. This one does only what a decode step needs, from the same weights:
fused q/k/v and gate/up projections (one matrix product each instead of three and two), the 1/sqrt(head_dim)
attention scale folded into the query weights, rotary embeddings as one small matrix per row built once per step
and shared by every layer, grouped-query attention without repeating keys, and keys/values written straight into
the engine's slot cache. Models it does not support keep transformers' forward (batch.HFDecoder).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from inference import integer_kernels
from inference.client import TokenLogprob
from inference.kv_cache import SlotCache
from inference.prefix_cache import CachedPrefix, prefill_start
from inference.quantization import Q4Linear, Q8Linear, Q8Rows
from inference.scoring import prompt_token_logprobs

if TYPE_CHECKING:  # importing it imports transformers' modeling code (~1.5 s, ~120 MB), which a saved decoder skips
    from transformers import PreTrainedModel

# Makes a linear layer from (weight [out, in], bias or None, name); the quantization mode decides its kind.
LinearFactory = Callable[[torch.Tensor, torch.Tensor | None, str], nn.Module]


class FloatLinear(nn.Module):
    """A float32 linear layer over given weights (nn.Linear would first fill fresh ones at random)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight.detach().float()
        self.bias: torch.Tensor | None = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> nn.Module:
    return FloatLinear(weight, bias)


class TableEmbedding(nn.Module):
    """Token embeddings looked up in a table (which may be stored smaller: float16 halves it), in float32."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens].float()


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as transformers' LlamaRMSNorm computes it, so float32 results match it exactly
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def lm_head_is_embedding(model: PreTrainedModel) -> bool:
    """Whether the LM head's weights are the token embeddings (tied, as in SmolLM2)."""
    head: Any = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    table: Any = model.get_input_embeddings()
    return head is not None and bool(head.weight.data_ptr() == table.weight.data_ptr())


class RunsAttention(nn.Module):
    """Decode attention with torch's matrix products: all rows at once when none is padded, else one run of rows of
    one length at a time, as an unpadded batch does: a sum over a padded key length differs in its last bits from the
    same sum alone, which formats that round activations to fewer bits (int4, int8) can turn into another token.
    Keys and values in float32. The float32 format's attention (it keeps transformers' numbers)."""

    needs_runs: bool = True

    def forward(
        self,
        query: torch.Tensor,
        key_buffer: torch.Tensor,
        value_buffer: torch.Tensor,
        start: int,
        end: int,
        runs: list[tuple[int, int, int]],
        row_starts: torch.Tensor,
    ) -> torch.Tensor:
        """query [rows, kv heads, groups, head dim] over the buffers' columns `start..end` (end excluded); returns
        [rows, heads * head dim]."""
        rows = query.shape[0]
        keys = key_buffer[:rows, :, start:end]
        values = value_buffer[:rows, :, start:end]
        if len(runs) == 0:
            attended = torch.matmul(torch.matmul(query, keys.transpose(2, 3)).softmax(-1), values)
        else:
            parts: list[torch.Tensor] = []
            for first, stop, own_start in runs:
                scores = torch.matmul(query[first:stop], keys[first:stop, :, own_start:].transpose(2, 3))
                parts.append(torch.matmul(scores.softmax(-1), values[first:stop, :, own_start:]))
            attended = torch.cat(parts)
        return attended.reshape(rows, -1)


# The attention kernel takes head sizes in multiples of 8 (SmolLM2, TinyLlama and Llama 3 have 64 or 128).
KERNEL_HEAD_SIZES = 8


class KernelAttention(nn.Module):
    """Decode attention in one call per layer (kernels/decode_attention.cpp): every row over its own columns, so no
    runs to find and no padding in any sum; keys and values in float16 or float32. The quantized formats' attention
    where our kernels build."""

    needs_runs: bool = False

    def forward(
        self,
        query: torch.Tensor,
        key_buffer: torch.Tensor,
        value_buffer: torch.Tensor,
        start: int,
        end: int,
        runs: list[tuple[int, int, int]],
        row_starts: torch.Tensor,
    ) -> torch.Tensor:
        attention = torch.ops.llm_serving.decode_attention
        attended: torch.Tensor = attention(query, key_buffer, value_buffer, row_starts, end)
        return attended


class DecoderLayer(nn.Module):
    """One transformer block. Written for TorchScript: a scripted module runs its whole step in C++, which at batch 1
    removes most of the Python and dispatch cost between the matrix products (docs/benchmarks.md)."""

    def __init__(
        self,
        attention_norm: torch.Tensor,
        qkv: nn.Module,
        out: nn.Module,
        mlp_norm: torch.Tensor,
        gate_up: nn.Module,
        down: nn.Module,
        shape: tuple[int, int, int],
        eps: float,
        attention: nn.Module,
    ) -> None:
        super().__init__()
        self.attention_norm, self.mlp_norm = attention_norm, mlp_norm
        self.attention = attention
        self.qkv, self.out, self.gate_up, self.down = qkv, out, gate_up, down
        self.heads, self.kv_heads, self.head_dim = shape
        self.groups = self.heads // self.kv_heads
        self.qk_width = (self.heads + self.kv_heads) * self.head_dim
        self.eps = eps

    @torch.jit.export
    def mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(rms_norm(hidden, self.mlp_norm, self.eps)).chunk(2, dim=-1)
        output: torch.Tensor = hidden + self.down(F.silu(gate) * up)
        return output

    @torch.jit.export
    def prompt_projections(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of prompts [rows, width, hidden], rotated; heads first, as the cache keeps them."""
        rows, width = hidden.shape[0], hidden.shape[1]
        qkv = self.qkv(rms_norm(hidden, self.attention_norm, self.eps))
        qkv = qkv.view(rows, width, self.heads + 2 * self.kv_heads, self.head_dim)
        qk = qkv[:, :, : self.heads + self.kv_heads]
        qk = qk * cos + torch.matmul(qk, rotation) * sin
        query = qk[:, :, : self.heads].transpose(1, 2)
        keys = qk[:, :, self.heads :].transpose(1, 2)
        return query, keys, qkv[:, :, self.heads + self.kv_heads :].transpose(1, 2)

    @torch.jit.export
    def prompt_rest(
        self,
        hidden: torch.Tensor,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        causal_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Causal attention over the cached keys and values, then the feed-forward block. `causal_mask` is needed
        when the keys start before the queries (a cached prefix); None means the square causal mask."""
        rows, width = hidden.shape[0], hidden.shape[1]
        attended = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=causal_mask, is_causal=causal_mask is None, scale=1.0, enable_gqa=True
        )
        hidden = hidden + self.out(attended.transpose(1, 2).reshape(rows, width, -1))
        return self.mlp(hidden)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: torch.Tensor,
        runs: list[tuple[int, int, int]],
        row_starts: torch.Tensor,
        key_buffer: torch.Tensor,
        value_buffer: torch.Tensor,
        start: int,
        end: int,
    ) -> torch.Tensor:
        """One decode step for rows [rows, hidden]: writes cache column `end` and attends over `start..end`;
        `runs` holds (first row, end row, left padding) for each run of consecutive rows of one length (empty when
        no row is padded, or when the attention does not need them), `row_starts` each row's first real column."""
        rows = hidden.shape[0]
        # 1. project; rotate queries and keys together with each row's rotation matrix
        qkv = self.qkv(rms_norm(hidden, self.attention_norm, self.eps))
        qk = torch.bmm(qkv[:, : self.qk_width].view(rows, -1, self.head_dim), rotary)
        # 2. this step's keys and values go straight into the cache's buffers
        key_buffer[:rows, :, end] = qk[:, self.heads :]
        value_buffer[:rows, :, end] = qkv[:, self.qk_width :].view(rows, self.kv_heads, self.head_dim)
        # 3. attention: each key/value head serves `groups` query heads, no copies of keys
        query = qk[:, : self.heads].view(rows, self.kv_heads, self.groups, self.head_dim)
        attended = self.attention(query, key_buffer, value_buffer, start, end + 1, runs, row_starts)
        hidden = hidden + self.out(attended)
        # 4. the feed-forward block
        return self.mlp(hidden)


class Q4DecoderLayer(DecoderLayer):
    """A DecoderLayer whose four projections are Q4Linear and whose attention is our kernel: its decode step is one
    C++ call (kernels/decode_layer.cpp), one parallel region, instead of the ~25 small torch ops around the matrix
    products, each a trip through TorchScript's interpreter and torch's dispatcher (docs/benchmarks.md). It takes
    each row's rotary factors as cos and sin [rows, 2, head dim] instead of a rotation matrix. Prefill is
    DecoderLayer's."""

    def __init__(self, layer: DecoderLayer) -> None:
        super().__init__(
            layer.attention_norm,
            layer.qkv,
            layer.out,
            layer.mlp_norm,
            layer.gate_up,
            layer.down,
            (layer.heads, layer.kv_heads, layer.head_dim),
            layer.eps,
            layer.attention,
        )
        # the kernel's weights in its order; the same tensors as the projections' (no copy)
        projections: list[Any] = self.projections(layer)
        self.weights = [tensor for p in projections for tensor in (p.packed, p.scales, p.lows)]

    @staticmethod
    def projections(layer: DecoderLayer) -> list[nn.Module]:
        """The layer's four projections, in the order the kernel takes their weights."""
        return [layer.qkv, layer.out, layer.gate_up, layer.down]

    @staticmethod
    def takes(layer: DecoderLayer) -> bool:
        projections = Q4DecoderLayer.projections(layer)
        return isinstance(layer.attention, KernelAttention) and all(isinstance(p, Q4Linear) for p in projections)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: torch.Tensor,
        runs: list[tuple[int, int, int]],
        row_starts: torch.Tensor,
        key_buffer: torch.Tensor,
        value_buffer: torch.Tensor,
        start: int,
        end: int,
    ) -> torch.Tensor:
        """As DecoderLayer.forward, with `rotary` each row's cos and sin [rows, 2, head dim]."""
        layer = torch.ops.llm_serving.q4_decode_layer
        output: torch.Tensor = layer(
            hidden,
            rotary,
            self.attention_norm,
            self.mlp_norm,
            self.eps,
            self.weights,
            self.heads,
            self.kv_heads,
            key_buffer,
            value_buffer,
            row_starts,
            end,
        )
        return output


class DecodeStep(nn.Module):
    """Every layer of one decode step, from token ids to logits, as one module (one TorchScript call per step)."""

    def __init__(
        self,
        layers: list[DecoderLayer],
        embed: nn.Module,
        final_norm: torch.Tensor,
        lm_head: nn.Module,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rotation: torch.Tensor,
        eps: float,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.eps = eps
        # whether the step must find the runs of rows of one length: only an attention that takes them needs it
        self.needs_runs = any(layer.attention.needs_runs for layer in layers)
        # the form of each row's rotary factors the layers take: cos and sin for Q4DecoderLayer, else a matrix
        self.rotary_pairs = all(isinstance(layer, Q4DecoderLayer) for layer in layers)
        self.embed, self.final_norm, self.lm_head = embed, final_norm, lm_head
        self.cos, self.sin, self.rotation = cos, sin, rotation

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_buffers: list[torch.Tensor],
        value_buffers: list[torch.Tensor],
        start: int,
        end: int,
    ) -> torch.Tensor:
        # 1. embeddings, and each row's rotary factors shared by every layer
        hidden = self.embed(tokens)
        if self.rotary_pairs:
            rotary = torch.stack([self.cos[positions], self.sin[positions]], dim=1)
        else:
            rotary = torch.diag_embed(self.cos[positions]) + self.rotation * self.sin[positions].unsqueeze(1)
        # 2. each row's first real column, and runs of consecutive rows with the same left padding (none when no row
        # has any) for an attention that takes the rows a run at a time
        runs: list[tuple[int, int, int]] = []
        if attention_mask is None:
            row_starts = torch.full_like(tokens, start)
        else:
            row_starts = (attention_mask == 0).sum(-1) + start
            if self.needs_runs:
                padding: list[int] = (row_starts - start).tolist()
                first = 0
                for row in range(1, len(padding)):
                    if padding[row] != padding[first]:
                        runs.append((first, row, padding[first]))
                        first = row
                runs.append((first, len(padding), padding[first]))
        # 3. the layers, each writing its column of the cache
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, rotary, runs, row_starts, key_buffers[index], value_buffers[index], start, end)
        # 4. logits for the next token
        logits: torch.Tensor = self.lm_head(rms_norm(hidden, self.final_norm, self.eps))
        return logits


@contextlib.contextmanager
def torchscript_warnings_silenced() -> Iterator[None]:
    """Around TorchScript's script, save and load: each warns that TorchScript is deprecated."""
    with warnings.catch_warnings():
        # TorchScript is in maintenance mode and warns so; it is still the way to run a step without Python in
        # between, and torch.compile needs a C++ toolchain and a long warm-up at every start (docs/benchmarks.md).
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _script(module: nn.Module) -> nn.Module:
    with torchscript_warnings_silenced():
        scripted: nn.Module = torch.jit.script(module)
        return scripted


class LlamaDecoder:
    """Prefill and decode for a Llama model; `linear` decides how the projections are stored (float32, int8...).
    It copies what it needs, so the transformers model may be dropped once it is built. `compiled` runs the layers
    as TorchScript (the default); eager mode computes the same and is kept for comparison and debugging.
    `attention_kernel` decodes with our attention kernel (KernelAttention) over a float16 KV cache, half the memory of
    float32's, where it loads (integer_kernels.load()) and takes the head size; else RunsAttention and float32.
    `one_call_layers`: where every layer is int4 on our kernels (Q4Linear, KernelAttention), each decodes in one C++
    call (Q4DecoderLayer); False keeps DecoderLayer's torch ops, for comparison."""

    def __init__(
        self,
        model: PreTrainedModel,
        linear: LinearFactory = plain_linear,
        embedding_dtype: torch.dtype | None = None,
        compiled: bool = True,
        attention_kernel: bool = False,
        one_call_layers: bool = True,
    ) -> None:
        config: Any = model.config
        inner: Any = model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.device = model.device
        fits = self.head_dim % KERNEL_HEAD_SIZES == 0 and self.device.type == "cpu"
        self.attention_kernel = attention_kernel and fits and integer_kernels.load() is None
        # the dtype the running batch keeps keys and values in (prefills compute in float32 and are converted as
        # their rows join it); None: float32, as prefilled
        self.cache_dtype = torch.float16 if self.attention_kernel else None
        layers = [self._layer(index, layer, linear, config.rms_norm_eps) for index, layer in enumerate(inner.layers)]
        if one_call_layers and layers and all(Q4DecoderLayer.takes(layer) for layer in layers):
            layers = [Q4DecoderLayer(layer) for layer in layers]
        lm_head = linear(model.lm_head.weight, None, "lm_head")
        embed: nn.Module
        if isinstance(lm_head, Q8Linear) and lm_head_is_embedding(model):
            # a tied 8-bit head holds the embeddings already (for SmolLM2 exactly: both are its GGUF's Q8_0 table)
            embed = Q8Rows(lm_head)
        else:
            # looked up a few rows a step, so it may be stored smaller (float16 halves it) and widened as read
            embed = TableEmbedding(inner.embed_tokens.weight.detach().to(embedding_dtype or torch.float32))
        # cos/sin of every position once (a few MB), from the model's own rotary module: any rope scaling it applies
        positions = torch.arange(config.max_position_embeddings, device=self.device).unsqueeze(0)
        cos, sin = inner.rotary_emb(inner.embed_tokens.weight[:1].detach().float(), positions)
        # rotate_half(x) == x @ rotation: rope(x) = x * cos + (x @ rotation) * sin
        half = self.head_dim // 2
        rotation = torch.zeros(self.head_dim, self.head_dim, device=self.device)
        rotation[torch.arange(half) + half, torch.arange(half)] = -1.0
        rotation[torch.arange(half), torch.arange(half) + half] = 1.0
        step = DecodeStep(
            layers,
            embed,
            inner.norm.weight.detach().float(),
            lm_head,
            cos[0].float(),
            sin[0].float(),
            rotation,
            config.rms_norm_eps,
        )
        self.step: nn.Module = _script(step) if compiled else step

    @classmethod
    def from_step(cls, step: nn.Module, cache_dtype: torch.dtype | None) -> LlamaDecoder:
        """A CPU decoder around a step built and saved at an earlier start (saved_decoders), without the model:
        what `__init__` would have made of it."""
        decoder = cls.__new__(cls)
        # all that serving reads; the rest of __init__'s attributes only steer building the step
        decoder.step, decoder.cache_dtype, decoder.device = step, cache_dtype, torch.device("cpu")
        return decoder

    def _layer(self, index: int, layer: Any, linear: LinearFactory, eps: float) -> DecoderLayer:
        attention, mlp = layer.self_attn, layer.mlp
        # the attention scale goes into the query weights, so no step multiplies the scores by it
        query = attention.q_proj.weight.detach().float() * self.head_dim**-0.5
        qkv = torch.cat([query, attention.k_proj.weight.detach().float(), attention.v_proj.weight.detach().float()])
        gate_up = torch.cat([mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float()])
        return DecoderLayer(
            attention_norm=layer.input_layernorm.weight.detach().float(),
            qkv=linear(qkv, None, f"model.layers.{index}.self_attn.q_proj"),
            out=linear(attention.o_proj.weight, None, f"model.layers.{index}.self_attn.o_proj"),
            mlp_norm=layer.post_attention_layernorm.weight.detach().float(),
            gate_up=linear(gate_up, None, f"model.layers.{index}.mlp.gate_proj"),
            down=linear(mlp.down_proj.weight, None, f"model.layers.{index}.mlp.down_proj"),
            shape=(self.heads, self.kv_heads, self.head_dim),
            eps=eps,
            attention=KernelAttention() if self.attention_kernel else RunsAttention(),
        )

    @property
    def layers(self) -> list[Any]:
        # named_children, not iteration: a ModuleList read back by torch.jit.load can't be iterated from Python
        step: Any = self.step
        return [layer for _, layer in step.layers.named_children()]

    @property
    def lm_head(self) -> nn.Module:
        step: Any = self.step
        lm_head: nn.Module = step.lm_head
        return lm_head

    # ----- prefill: prompts of one length, a fresh cache ---------------------------------------------------------

    def _prompt_forward(self, input_ids: torch.Tensor, cache: DynamicCache, offset: int = 0) -> torch.Tensor:
        """Every position's last hidden state for same-length prompts [rows, width] that go on from `offset`
        tokens already in `cache` (a cached prefix), appending theirs to it."""
        step: Any = self.step
        width = input_ids.shape[1]
        # 1. token embeddings, each position's rotary factors, and which keys each position may see
        hidden = step.embed(input_ids)
        positions = slice(offset, offset + width)
        cos, sin = step.cos[positions].unsqueeze(1), step.sin[positions].unsqueeze(1)  # [width, 1, head_dim]
        causal_mask = None
        if offset:
            seen = torch.arange(offset + width, device=self.device)
            causal_mask = seen[None, :] <= seen[offset:, None]  # [width, offset + width]
        for index, layer in enumerate(self.layers):
            # 2. attention: project and rotate, cache keys and values, attend causally; then the feed-forward block
            query, keys, values = layer.prompt_projections(hidden, cos, sin, step.rotation)
            keys, values = cache.update(keys, values, index)
            hidden = layer.prompt_rest(hidden, query, keys, values, causal_mask)
        return rms_norm(hidden, step.final_norm, step.eps)

    @torch.inference_mode()
    def prefill(
        self, prompts: list[list[int]], prefix: CachedPrefix | None = None
    ) -> tuple[DynamicCache, torch.Tensor]:
        """Run same-length prompts through the model; return their cache and the last position's logits. With
        `prefix`, an opening every prompt starts with, only the tokens after it are computed."""
        skip, cache, rest = prefill_start(prefix, prompts)
        hidden = self._prompt_forward(torch.tensor(rest, dtype=torch.long, device=self.device), cache, skip)
        logits: torch.Tensor = self.lm_head(hidden[:, -1])
        return cache, logits

    @torch.inference_mode()
    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits for token_ids [1, n] (the quality check's perplexity)."""
        logits: torch.Tensor = self.lm_head(self._prompt_forward(token_ids.to(self.device), DynamicCache()))
        return logits

    @torch.inference_mode()
    def prompt_logprobs(self, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability given those before it, and the top_n alternatives."""
        hidden = self._prompt_forward(torch.tensor([token_ids], device=self.device), DynamicCache())[0]
        return prompt_token_logprobs(hidden, self.lm_head, token_ids, top_n)

    # ----- decode: one new token per row of the running batch ----------------------------------------------------

    @torch.inference_mode()
    def decode(
        self, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Feed each row's newest token ([rows, 1]) at its position; `attention_mask` [rows, columns] marks the
        cache's real columns (the new one included, whose slot `cache.reserve_columns(1)` made). Returns logits."""
        layers = cache.slot_layers()
        # a mask of all ones (no row padded: always so at batch 1) needs no -inf added to the scores
        mask = None if bool(attention_mask.all()) else attention_mask
        logits: torch.Tensor = self.step(
            tokens[:, 0],
            positions[:, 0],
            mask,
            [layer.key_buffer for layer in layers],
            [layer.value_buffer for layer in layers],
            cache.start,
            cache.end,
        )
        # the step wrote column `end` of every layer's buffers
        cache.advance(1)
        return logits
