"""Which 8-bit scheme could pass the quality gate on the default model? Simulated in float32, no kernel needed.

    python bench/bench_int8_variants.py     # prints a table and writes its section of docs/benchmarks.md

Each projection's weights and/or inputs are rounded as a scheme would round them (per output channel or per group
of 32 inputs; activations per row or per group of 32), then multiplied in float32, and the result goes through the
start-up quality check against float32 (inference/quantization.py: perplexity within 3%, likeliest next token kept
at 98% of positions). The LM head stays in float32, SmoothQuant's scales as the server calibrates them. So a
scheme that fails here fails with any kernel, however fast; one that passes is worth a kernel.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import replace_section  # noqa: E402
from inference import fast_llama  # noqa: E402
from inference.decoders import TransformersDecoder, _Measurements  # noqa: E402
from inference.quantization import compare, smoothing_scales  # noqa: E402

Rounding = Callable[[torch.Tensor], torch.Tensor]
GROUP = 32


def per_row(levels: int) -> Rounding:
    """Symmetric rounding with one scale per row (last dimension): per output channel for weights, per token for
    activations."""

    def rounded(t: torch.Tensor) -> torch.Tensor:
        scale = t.abs().amax(-1, keepdim=True).clamp_min(1e-30) / levels
        return (t / scale).round().clamp(-levels, levels) * scale

    return rounded


def per_group(levels: int) -> Rounding:
    """Symmetric rounding with one scale per 32 consecutive values of the last dimension (GGUF's Q8_0)."""
    row = per_row(levels)

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return row(t.reshape(*t.shape[:-1], t.shape[-1] // GROUP, GROUP)).reshape(t.shape)

    return rounded


def unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


class RoundedLinear(nn.Module):
    """`y = round_a(x / s) round_w(W s)^T` in float32, s being SmoothQuant's per-input scales."""

    def __init__(self, weight: torch.Tensor, smoothing: torch.Tensor, weights: Rounding, inputs: Rounding) -> None:
        super().__init__()
        self.inverse_smoothing = 1 / smoothing
        self.weight = weights(weight * smoothing)
        self.inputs = inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inputs(x * self.inverse_smoothing) @ self.weight.T


SCHEMES: dict[str, tuple[Rounding, Rounding]] = {
    "the server's int8: weights 7-bit per channel, activations 8-bit per row": (per_row(63), per_row(127)),
    "weights 7-bit per channel only": (per_row(63), unchanged),
    "weights 8-bit per channel only": (per_row(127), unchanged),
    "weights 8-bit per group of 32 only": (per_group(127), unchanged),
    "activations 8-bit per row only": (unchanged, per_row(127)),
    "activations 8-bit per group of 32 only": (unchanged, per_group(127)),
    "weights and activations 8-bit per group of 32 (llama.cpp's Q8_0 path)": (per_group(127), per_group(127)),
}


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.loader import resolve_location
    from inference.settings import Settings

    torch.set_grad_enabled(False)
    _, location = resolve_location(Settings())
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    measured = _Measurements(model, tokenizer, TransformersDecoder(model))
    absmax = measured.absmax

    def factory(weights: Rounding, inputs: Rounding) -> fast_llama.LinearFactory:
        def make(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> nn.Module:
            weight = weight.detach().float()
            if name == "lm_head":
                return fast_llama.FloatLinear(weight, bias)
            return RoundedLinear(weight, smoothing_scales(weight, absmax[name]), weights, inputs)

        return make

    lines = [
        "## Which 8-bit scheme passes the quality gate? (`bench/bench_int8_variants.py`)",
        "",
        "Each scheme simulated in float32 on the default model (LM head in float32, SmoothQuant as the server",
        "calibrates it), through the start-up quality check against float32 (gate: perplexity within 3%, likeliest",
        "token kept at 98% of positions).",
        "",
        "| scheme | perplexity change | likeliest token kept | passes |",
        "| --- | --- | --- | --- |",
    ]
    for name, (weights, inputs) in SCHEMES.items():
        decoder = fast_llama.LlamaDecoder(model, factory(weights, inputs), compiled=False)
        quality = compare(measured.reference, decoder.logits(measured.check_ids), measured.check_ids)
        print(f"{name}: {quality}", flush=True)
        verdict = "yes" if quality.passes else "no"
        lines.append(f"| {name} | {quality.perplexity_increase:+.1%} | {quality.top1_agreement:.1%} | {verdict} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    replace_section(ROOT / "docs" / "benchmarks.md", "int8-variants", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
