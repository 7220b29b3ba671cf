"""Linear-layer kernels on this CPU, one decoder layer's shapes (SmolLM2-135M), at batch 1 and 16: which to build on.

    python bench/bench_kernels.py                       # writes its section of docs/benchmarks.md
    PYTHONPATH=<folder with torchao> python bench/bench_kernels.py   # adds torchao's configs (not a dependency)

Each variant multiplies the same random weights; steps are interleaved across variants (a noisy neighbour slows all
alike) and medians reported. torchao's configs run eagerly, as a server that can't afford torch.compile's warm-up
would run them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description  # noqa: E402
from bench.report import replace_section  # noqa: E402
from inference.quantization import Float16Linear, Int4Linear, Int8Linear  # noqa: E402

# (out, in) of one SmolLM2-135M layer's projections: fused q/k/v, attention output, fused gate/up, down
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]

Layer = Callable[[torch.Tensor], torch.Tensor]


def variants(weights: list[torch.Tensor]) -> dict[str, list[Layer]]:
    found: dict[str, list[Layer]] = {
        "float32 (F.linear)": [lambda x, w=w: torch.nn.functional.linear(x, w) for w in weights],
        "fbgemm float16 weights (served)": [Float16Linear(w, None) for w in weights],
        "fbgemm int8, per-row activations (served)": [Int8Linear(w, None, None) for w in weights],
        "aten int4 in groups of 32, bfloat16 activations (served)": [Int4Linear(w, None) for w in weights],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = [_linear(w) for w in weights]
        found["torch.ao dynamic int8 (deprecated API)"] = [
            torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(m)), {nn.Linear}, torch.qint8)
            for m in plain
        ]
    packed = []
    for w in weights:
        scales = w.abs().amax(dim=1) / 127
        packed.append(((w / scales[:, None]).round().to(torch.int8), scales))
    found["aten _weight_int8pack_mm (int8 weight-only)"] = [
        lambda x, q=q, s=s: torch.ops.aten._weight_int8pack_mm(x, q, s) for q, s in packed
    ]
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("torchao is not importable: its rows are left out", file=sys.stderr)
        return found
    for name, config in (
        ("torchao Int8DynamicActivationInt8Weight", Int8DynamicActivationInt8WeightConfig),
        ("torchao Int8WeightOnly", Int8WeightOnlyConfig),
    ):
        layers = [copy.deepcopy(m) for m in plain]
        for layer in layers:
            quantize_(layer, config())
        found[name] = layers
    return found


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return layer.eval()


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(out, inputs) * 0.05 for out, inputs in SHAPES]
    layers = variants(weights)
    results: dict[int, dict[str, float]] = {}
    for rows in (1, 16):
        inputs = [torch.randn(rows, w.shape[1]) for w in weights]
        times: dict[str, list[float]] = {name: [] for name in layers}
        for _ in range(args.repeats):
            for name, modules in layers.items():
                started = time.perf_counter()
                for _ in range(10):  # ten layers' worth, so each sample is well above the timer's resolution
                    for module, x in zip(modules, inputs, strict=True):
                        module(x)
                times[name].append((time.perf_counter() - started) / 10)
        results[rows] = {name: statistics.median(t[2:]) * 1000 for name, t in times.items()}
    base = results[1]["float32 (F.linear)"], results[16]["float32 (F.linear)"]
    lines = [
        "## Linear kernels on this CPU (`bench/bench_kernels.py`)",
        "",
        f"On {cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads: one SmolLM2-135M",
        "layer's four projections (fused q/k/v, output, fused gate/up, down), milliseconds per layer, medians.",
        "Below 1.00x is faster than float32. What the served formats are built on was chosen from this table.",
        "",
        "| kernel | batch 1 (ms) | vs float32 | batch 16 (ms) | vs float32 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in layers:
        one, sixteen = results[1][name], results[16][name]
        lines.append(f"| {name} | {one:.3f} | {one / base[0]:.2f}x | {sixteen:.3f} | {sixteen / base[1]:.2f}x |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    replace_section(args.report, "kernels", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
