"""Smaller weights for CPU decoding: int8 or float16 linear layers on fbgemm, PyTorch's x86 kernels.

Decoding one token reads every weight once, so on a CPU a step costs about what moving the weights costs: int8 reads
a quarter of float32's bytes, float16 half. What each mode does:

- `float16`: weights stored in float16, multiplied in float32 (fbgemm's fp16 GEMM). The bundled SmolLM2 is converted
  to float16 weights (loader.py), so for it this mode is exact.
- `int8`: weights in int8 with one scale per output channel; activations quantized per row (per token) at run time,
  so a row's numbers never depend on the other rows of its batch (integer accumulation is exact); SmoothQuant moves
  activation outliers into the weights (scales calibrated on a built-in text); the LM head, the most sensitive
  layer, stays in float16.

Why fbgemm: on an AVX2 CPU without AVX-512 or AMX, its kernels were the fastest int8 and float16 paths measured;
torchao's int8 configs (run eagerly) and `_weight_int8pack_mm` were slower than float32 (bench/bench_kernels.py,
docs/benchmarks.md). Its Python front end (`torch.ao.quantization`) is deprecated; the C++ ops used here are not,
but the quantized tensors needed to pack int8 weights are: that is confined to `_pack_int8`, pinned with torch, and
covered by tests.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from inference import integer_kernels

logger = logging.getLogger(__name__)

QuantizedFormat = Literal["int4", "int8", "float16"]

# Weights use 7 bits (±63) so that fbgemm's AVX2 kernel, which adds pairs of uint8 x int8 products in int16, can't
# saturate with 8-bit activations (255 * 63 * 2 < 32767); 8-bit weights with 7-bit activations measured worse.
WEIGHT_LEVELS = 63
# A per-row-normalised activation lies in [-1, 1]; this maps it onto uint8 1..255 around 128.
ACTIVATION_SCALE = 1 / 127
ACTIVATION_ZERO_POINT = 128
# SmoothQuant's migration strength: 0.5 splits the outliers' range evenly between activations and weights.
SMOOTHING_ALPHA = 0.5
TINY = 1e-30
# int4 weights come in groups of this many inputs, each with its own scale and offset (GGUF's Q4_1 uses 32).
INT4_GROUP = 32
# Outputs per AVX2 register in our integer kernels' layout (kernels/integer_linear.cpp).
KERNEL_VECTOR = 8
# Vectors of outputs per tile, the unit the kernels' threads split; Q4_1 keeps a tile's vectors side by side.
KERNEL_TILE = 4


def fbgemm_available() -> bool:
    """Whether this torch build has the fbgemm kernels (x86 CPUs with AVX2)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def int4_available() -> bool:
    """Whether this torch build has the CPU int4 weight-only matmul (torch 2.5 and later)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _pack_int8(weight: torch.Tensor) -> tuple[torch.ScriptObject, torch.Tensor]:
    """Per-output-channel symmetric int8 weights, packed for fbgemm; returns the packed weights and their scales."""
    scales = (weight.abs().amax(dim=1) / WEIGHT_LEVELS).clamp_min(TINY)
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm's packing still takes only them
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_channel(weight.float(), scales.double(), zero_points, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(quantized, None), scales


def smoothing_scales(weight: torch.Tensor, input_absmax: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's per-input-channel s: the activations are divided by it and the weights [out, in] multiplied,
    moving the activations' outliers into the weights by SMOOTHING_ALPHA."""
    activation_range = input_absmax.float().clamp_min(1e-5).pow(SMOOTHING_ALPHA)
    return activation_range / weight.abs().amax(dim=0).clamp_min(1e-5).pow(1 - SMOOTHING_ALPHA)


class Int8Linear(nn.Module):
    """`y = x W^T + b` with int8 weights and per-row int8 activations (fbgemm)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_absmax: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        smoothing = torch.ones(self.in_features) if input_absmax is None else smoothing_scales(weight, input_absmax)
        self.packed, _ = _pack_int8(weight * smoothing)
        self.inverse_smoothing: torch.Tensor = 1 / smoothing
        self.bias: torch.Tensor | None = None if bias is None else bias.detach().float().clone()
        # attributes rather than module globals, which TorchScript would not see
        self.activation_scale, self.activation_zero_point, self.tiny = ACTIVATION_SCALE, ACTIVATION_ZERO_POINT, TINY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features) * self.inverse_smoothing
        # 1. each row scaled into [-1, 1] by its own largest value, so the fixed quantization grid fits every row
        row_scale = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_min_(self.tiny)
        # 2. quantize, multiply in integers, dequantize: one fbgemm call
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            rows / row_scale, self.activation_scale, self.activation_zero_point, self.packed
        )
        # 3. undo the row scaling (and add the bias, which must not be scaled)
        bias = self.bias
        y = y * row_scale if bias is None else torch.addcmul(bias, y, row_scale)
        return y.reshape(list(x.shape[:-1]) + [self.out_features])  # noqa: RUF005 (TorchScript: no star in calls)


class Float16Linear(nn.Module):
    """`y = x W^T + b` with float16 weights, computed in float32 (fbgemm's fp16 GEMM)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        bias = None if bias is None else bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features), self.packed)
        return y.reshape(list(x.shape[:-1]) + [self.out_features])  # noqa: RUF005 (TorchScript: no star in calls)


def int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights [out, in] in groups of INT4_GROUP inputs, each spanning 16 levels from its low end (GGUF's Q4_1):
    the levels [out, groups, INT4_GROUP] (uint8, 0..15), and each group's scale and low end [out, groups, 1]."""
    groups = weight.detach().float().reshape(weight.shape[0], -1, INT4_GROUP)
    low = groups.amin(dim=-1, keepdim=True)
    scale = ((groups.amax(dim=-1, keepdim=True) - low) / 15).clamp_min(TINY)
    levels = (groups - low).div_(scale).round_().clamp_(0, 15)
    # a byte a level: packing for our kernels moves a quarter of int32's bytes (start-up)
    return levels.to(torch.uint8), scale, low


class Int4Linear(nn.Module):
    """`y = x W^T + b` with 4-bit weights in groups of 32 inputs, each group with its own scale and offset, and
    bfloat16 activations (torch's `_weight_int4pack_mm_for_cpu`, whose bfloat16 path is the fast one), out in float32.

    That layout is GGUF's Q4_1, the format the bundled SmolLM2 ships in: its float weights are Q4_1 values, whose
    groups this recovers (every group spans its 16 levels), so for it int4 reads a quarter of float16's bytes and
    changes only the rounding of scales and activations to bfloat16. A row's numbers don't depend on its batch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        levels, scale, low = int4_groups(weight)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.reshape(weight.shape).int(), 1)
        # the kernel computes (level - 8) * scale + zero, so zero is the group's low end moved up by 8 levels
        scales_and_zeros = torch.cat([scale, low + 8 * scale], dim=-1)  # [out, groups, 2]
        self.scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)
        self.bias: torch.Tensor | None = None if bias is None else bias.detach().float().clone()
        self.group = INT4_GROUP

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        """The kernel's shape rules: outputs a multiple of 16, inputs of the group size."""
        return weight.shape[0] % 16 == 0 and weight.shape[1] % INT4_GROUP == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        product: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.packed, self.group, self.scales_and_zeros
        )
        y = product.float()
        bias = self.bias
        if bias is not None:
            y = y + bias
        return y.reshape(list(x.shape[:-1]) + [self.out_features])  # noqa: RUF005 (TorchScript: no star in calls)


def _by_vector(values: torch.Tensor) -> torch.Tensor:
    """Per-group values [out, groups, 1] in the kernels' order [out / 8, groups, 8], in float16 (as GGUF keeps its
    scales: exact for the bundled model)."""
    vectors = values.reshape(values.shape[0] // KERNEL_VECTOR, KERNEL_VECTOR, -1).transpose(1, 2)
    return vectors.to(torch.float16).contiguous()


def _steps(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels [out, in] split as the kernels read them, for each vector of 8 outputs v and 4 inputs q: the levels of
    inputs 4q, 4q + 1 and of 4q + 2, 4q + 3, each [out / 8, in / 4, 16] with lane 2j + i for output 8v + j."""
    out_features, in_features = levels.shape
    by_step = levels.reshape(out_features // KERNEL_VECTOR, KERNEL_VECTOR, in_features // 4, 4)  # [v, j, q, i]
    near = by_step[..., 0:2].permute(0, 2, 1, 3).reshape(out_features // KERNEL_VECTOR, in_features // 4, 16)
    far = by_step[..., 2:4].permute(0, 2, 1, 3).reshape(out_features // KERNEL_VECTOR, in_features // 4, 16)
    return near, far


def _tiled(by_vector: torch.Tensor) -> torch.Tensor:
    """Per-vector values [out / 8, n, m] in the kernels' tiled order (kernels/integer_linear.cpp: Q4_1's layout), in
    the same shape: for each tile of KERNEL_TILE vectors (fewer in the last) and each of the n, the tile's vectors
    side by side."""
    vectors = by_vector.shape[0]
    full = vectors - vectors % KERNEL_TILE
    tiles = by_vector[:full].reshape(-1, KERNEL_TILE, *by_vector.shape[1:]).transpose(1, 2)  # [tiles, n, 4, m]
    rest = by_vector[full:].transpose(0, 1)  # [n, vectors % KERNEL_TILE, m]
    return torch.cat([tiles.reshape(-1), rest.reshape(-1)]).reshape(by_vector.shape)


def kernel_fits(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Our kernels' shape rules: no bias, outputs a multiple of 8, inputs of the group size."""
    return bias is None and weight.shape[0] % KERNEL_VECTOR == 0 and weight.shape[1] % INT4_GROUP == 0


class Q4Linear(nn.Module):
    """`y = x W^T` with W in 4-bit Q4_1 groups and x rounded per row to 16 bits, multiplied in integers by our own
    AVX2 kernel (kernels/integer_linear.cpp). Rounding activations to 16 bits keeps the model's answers where
    torch's kernel, which rounds them to bfloat16 (8 significant bits), loses some; integer sums make a row's numbers
    the same alone and in any batch; half a byte a weight makes it faster than fbgemm's float16 for a few rows and
    as fast for many (docs/benchmarks.md)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        levels, scale, low = int4_groups(weight)
        near, far = _steps(levels.reshape(weight.shape))
        # byte p holds lane p of both: the first operand in its low nibble, the second in its high one; tiled, so
        # that each thread streams its share of the weights in one run
        self.packed = _tiled(near | (far << 4))
        self.scales, self.lows = _tiled(_by_vector(scale)), _tiled(_by_vector(low))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y: torch.Tensor = torch.ops.llm_serving.q4_1_linear(rows, self.packed, self.scales, self.lows)
        return y.reshape(list(x.shape[:-1]) + [self.out_features])  # noqa: RUF005 (TorchScript: no star in calls)


def int8_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [out, in] in groups of INT4_GROUP inputs rounded to -127..127 times a scale each (GGUF's Q8_0, the
    bundled SmolLM2's LM head): the levels [out, in] (int8) and each group's scale [out, groups, 1]."""
    groups = weight.detach().float().reshape(weight.shape[0], -1, INT4_GROUP)
    scale = (groups.abs().amax(dim=-1, keepdim=True) / 127).half().float().clamp_min(TINY)
    return (groups / scale).round_().clamp_(-127, 127).to(torch.int8).reshape(weight.shape), scale


class Q8Linear(nn.Module):
    """`y = x W^T` with W in 8-bit Q8_0 groups and x rounded per row to 16 bits, on our AVX2 kernel: for the LM
    head, which the bundled SmolLM2 ships in Q8_0 (so exact for it) and which int4 would coarsen. Half float16's
    bytes; a row's numbers the same alone and in any batch."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        levels, scale = int8_groups(weight)
        near, far = _steps(levels)
        self.packed = torch.cat([near, far], dim=-1).view(torch.uint8)
        self.scales = _by_vector(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y: torch.Tensor = torch.ops.llm_serving.q8_0_linear(rows, self.packed, self.scales)
        return y.reshape(list(x.shape[:-1]) + [self.out_features])  # noqa: RUF005 (TorchScript: no star in calls)


class Q8Rows(nn.Module):
    """Rows of a Q8Linear's weights, read from its packed levels and scales (the same tensors, no copy) in float32:
    a tied LM head's rows are the token embeddings, so the model needs no second table of them (SmolLM2: 57 MB in
    float16). Each is exactly the level times the scale the kernel multiplies."""

    def __init__(self, head: Q8Linear) -> None:
        super().__init__()
        # the head's own tensors: no view of another dtype, which torch.jit.save/load would turn into the same dtype
        self.packed, self.scales, self.in_features = head.packed, head.scales, head.in_features
        self.lanes, self.group = KERNEL_VECTOR, INT4_GROUP  # attributes: TorchScript can't read module globals

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        flat = indices.reshape(-1)
        count = flat.shape[0]
        # row r is lane r % 8 of vector r // 8: undo _steps' split (inputs 4q, 4q + 1 near, 4q + 2, 4q + 3 far)
        vector, lane = torch.div(flat, self.lanes, rounding_mode="floor"), flat % self.lanes
        steps = self.packed[vector].view(count, self.in_features // 4, 2, self.lanes, 2)
        unsigned = steps[torch.arange(count), :, :, lane].reshape(count, -1, self.group).to(torch.int16)
        levels = unsigned - (unsigned > 127).to(torch.int16) * 256  # the bytes are two's-complement int8 levels
        scales = self.scales[vector, :, lane].float().unsqueeze(-1)  # [count, groups, 1]
        rows = (levels.float() * scales).reshape(count, self.in_features)
        return rows.reshape(list(indices.shape) + [self.in_features])  # noqa: RUF005 (TorchScript: no star in calls)


def make_linear(
    fmt: QuantizedFormat, weight: torch.Tensor, bias: torch.Tensor | None, input_absmax: torch.Tensor | None
) -> nn.Module:
    if fmt == "int4" and integer_kernels.load() is None and kernel_fits(weight, bias):
        return Q4Linear(weight)
    if fmt == "int4" and Int4Linear.fits(weight):
        return Int4Linear(weight, bias)
    if fmt == "int8":
        return Int8Linear(weight, bias, input_absmax)
    return Float16Linear(weight, bias)  # and int4's layers of a shape its kernel can't take


# ----- calibration and the quality check ---------------------------------------------------------------------------


# The quality gate: against float32 on the built-in text, perplexity may rise at most 3% and the likeliest next
# token must stay the same at 98% of positions (int8 on SmolLM2-135M kept perplexity within 3% while greedy answers
# drifted: perplexity alone did not catch it).
MAX_PERPLEXITY_INCREASE = 0.03
MIN_TOP1_AGREEMENT = 0.98


@dataclass(frozen=True)
class QualityCheck:
    """A weight format measured against float32 on the same text."""

    perplexity_float32: float
    perplexity: float
    top1_agreement: float  # share of positions whose likeliest next token is float32's

    @property
    def perplexity_increase(self) -> float:
        return self.perplexity / self.perplexity_float32 - 1

    @property
    def passes(self) -> bool:
        return self.perplexity_increase <= MAX_PERPLEXITY_INCREASE and self.top1_agreement >= MIN_TOP1_AGREEMENT

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.2f} vs {self.perplexity_float32:.2f} in float32 "
            f"({self.perplexity_increase:+.1%}), likeliest token kept at {self.top1_agreement:.1%} of positions"
        )


def compare(reference: torch.Tensor, logits: torch.Tensor, token_ids: torch.Tensor) -> QualityCheck:
    """Logits [1, n, vocab] of `token_ids` [1, n] under float32 (`reference`) and a smaller format."""
    agreement = (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()
    return QualityCheck(perplexity(reference, token_ids), perplexity(logits, token_ids), round(agreement, 4))


@torch.inference_mode()
def input_absmax(model: nn.Module, token_ids: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The largest |value| each input channel of the named submodules sees while `model(token_ids)` runs."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            absmax = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).float()
            seen[name] = absmax if name not in seen else torch.maximum(seen[name], absmax)

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        model(token_ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def perplexity(logits: torch.Tensor, token_ids: torch.Tensor) -> float:
    """exp(mean negative log-likelihood) of `token_ids` [1, n] given each position's `logits` [1, n, vocab]."""
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), token_ids[0, 1:].to(logits.device))
    return math.exp(loss.item())
