"""An experiment for issue 11: a 4-bit weight kernel of our own against fbgemm's float16 one, on the default model.

    python bench/bench_int4_kernel.py --avx2   # needs a C++ compiler (g++) and ninja (requirements-dev.txt)

The bundled SmolLM2 comes from a GGUF file in Q4_1 (4-bit values in groups of 32 inputs, a scale and a low end per
group), so its projections can be stored in 4 bits exactly: a quarter of float16's bytes. torch's own 4-bit CPU
kernel is slower than float16 on an AVX2 CPU (docs/benchmarks.md), so this builds one (bench/kernels/int4_linear.cpp,
AVX2 + FMA, activations in float32) with torch's C++ extension tooling and times every projection of one decode step
(30 layers: fused q/k/v, out, fused gate/up, down; the LM head is 8-bit in the GGUF and not included) against
`linear_dynamic_fp16`, which the server runs, interleaved, medians. It also checks the kernel's numbers against a
float32 matrix product of the same weights and that a row's result is the same bit for bit alone and in a batch;
it exits with 1 if either check fails. The server does not use this kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cap_kernels_at_avx2, cpu_description  # noqa: E402
from bench.report import replace_section  # noqa: E402

LANES = 16  # outputs per tile in the kernel
ROWS = (1, 2, 4, 16)


def build_kernel() -> None:
    """Compile bench/kernels/int4_linear.cpp (about 10 s) and register it as torch.ops.llm_kernels.int4_linear."""
    from torch.utils.cpp_extension import load

    build = Path(tempfile.gettempdir()) / "llm-serving-int4-kernel"
    build.mkdir(exist_ok=True)
    load(
        name="llm_kernels",
        sources=[str(ROOT / "bench" / "kernels" / "int4_linear.cpp")],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-std=c++17"],
        build_directory=str(build),
        is_python_module=False,
    )


def pack(weight: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The kernel's layout for a float weight [out, in] whose groups of 32 hold 16 levels each (Q4_1): 4-bit levels
    [tiles, groups, 16, 16], scales and low ends [tiles, groups, 16]; and the float weights those stand for."""
    import torch  # imported late: --avx2 must cap the kernels before torch loads

    from inference.quantization import int4_groups

    out_features, in_features = weight.shape
    levels, scale, low = int4_groups(weight)  # the server's int4 recovers the groups the same way
    dequantized = (levels.float() * scale + low).reshape(out_features, in_features)
    levels, scale, low = levels.to(torch.uint8), scale[..., 0], low[..., 0]
    # byte j of a group holds input j in its low nibble and input j + 16 in its high one
    nibbles = levels[..., :16] | (levels[..., 16:] << 4)  # [out, groups, 16]
    tiles = out_features // LANES
    packed = nibbles.reshape(tiles, LANES, -1, 16).permute(0, 2, 3, 1).contiguous()
    scales = scale.reshape(tiles, LANES, -1).permute(0, 2, 1).contiguous()
    lows = low.reshape(tiles, LANES, -1).permute(0, 2, 1).contiguous()
    return (packed, scales, lows), dequantized


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avx2", action="store_true", help="cap torch's kernels at AVX2 (the kernel is AVX2 only)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if args.avx2:
        cap_kernels_at_avx2()
    import torch
    from transformers import AutoModelForCausalLM

    from inference.loader import resolve_location
    from inference.settings import Settings

    torch.set_grad_enabled(False)
    build_kernel()
    int4_linear = torch.ops.llm_kernels.int4_linear
    _, location = resolve_location(Settings())
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    projections = []
    recovery_error = 0.0
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for weight in (
            torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
            attention.o_proj.weight,
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            mlp.down_proj.weight,
        ):
            packed, dequantized = pack(weight)
            recovery_error = max(recovery_error, (dequantized - weight).abs().max().item())
            projections.append((packed, torch.ops.quantized.linear_prepack_fp16(dequantized, None), dequantized))
    failures = []
    results: dict[int, tuple[float, float]] = {}
    for rows in ROWS:
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for _, _, w in projections}
        packed, _, dequantized = projections[2]
        batched = int4_linear(inputs[dequantized.shape[1]], *packed)
        error = (batched - inputs[dequantized.shape[1]] @ dequantized.T).abs().max().item()
        alone = int4_linear(inputs[dequantized.shape[1]][:1], *packed)
        identical = torch.equal(alone[0], batched[0])
        if error > 1e-3 or not identical:
            failures.append(f"rows {rows}: error {error:.1e}, row 0 identical alone and batched: {identical}")
        kernel_times, fbgemm_times = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for packed, _, dequantized in projections:
                int4_linear(inputs[dequantized.shape[1]], *packed)
            kernel_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            for _, prepacked, dequantized in projections:
                torch.ops.quantized.linear_dynamic_fp16(inputs[dequantized.shape[1]], prepacked)
            fbgemm_times.append(time.perf_counter() - started)
        results[rows] = (statistics.median(kernel_times) * 1000, statistics.median(fbgemm_times) * 1000)
        kernel_ms, fbgemm_ms = results[rows]
        print(f"rows {rows}: int4 kernel {kernel_ms:.2f} ms, fbgemm float16 {fbgemm_ms:.2f} ms", flush=True)
    lines = [
        "## A 4-bit kernel of our own, an experiment (`bench/bench_int4_kernel.py`)",
        "",
        f"On {cpu_description()}, torch threads {torch.get_num_threads()}: milliseconds for every projection",
        "of one decode step of the default model (30 layers, LM head excluded), medians of",
        f"{args.repeats}, interleaved. The kernel (bench/kernels/int4_linear.cpp, AVX2 + FMA) reads the Q4_1 weights",
        "in 4 bits with float32 activations; fbgemm's float16 kernel is what the server runs. The 4-bit levels stand",
        f"for the converted model's float16 weights to within {recovery_error:.1e}; every row's numbers identical",
        "alone and batched.",
        "",
        "| rows | int4 kernel (ms) | fbgemm float16 (ms) | int4 / float16 |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {rows} | {k:.2f} | {f:.2f} | {k / f:.2f} |" for rows, (k, f) in results.items()]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    if failures:
        return 1
    replace_section(args.report, "int4-kernel", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
