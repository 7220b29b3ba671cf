"""The int4 format's kernels against fbgemm's float16, on every projection of the default model's decode step.

    python bench/bench_int4_kernel.py --avx2   # needs g++ (the kernels are built as the server builds them)

Times, per batch size, one decode step's projections (30 layers: fused q/k/v, out, fused gate/up, down) plus the LM
head, in the server's own layers: our kernels (quantization.Q4Linear for the layers, Q8Linear for the LM head:
4- and 8-bit weights times 16-bit activations, in integers), torch's int4 kernel (quantization.Int4Linear, bfloat16
activations; LM head float16, as it serves) and fbgemm's float16 (Float16Linear, what QUANTIZATION=float16 serves).
Interleaved, medians. It also checks that our kernels give a row the same bits alone and in the batch, and stay within
1e-3 of the float32 product; it exits with 1 if not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cap_kernels_at_avx2, cpu_description  # noqa: E402
from bench.report import replace_section  # noqa: E402

ROWS = (1, 2, 4, 16, 64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avx2", action="store_true", help="cap torch's kernels at AVX2 (ours are AVX2 only)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if args.avx2:
        cap_kernels_at_avx2()
    import torch  # imported late: --avx2 must cap the kernels before torch loads
    from transformers import AutoModelForCausalLM

    from inference import integer_kernels
    from inference.loader import resolve_location
    from inference.quantization import Float16Linear, Int4Linear, Q4Linear, Q8Linear
    from inference.settings import Settings

    torch.set_grad_enabled(False)
    why_not = integer_kernels.load()
    if why_not is not None:
        print(f"Our kernels are unavailable: {why_not}", file=sys.stderr)
        return 1
    _, location = resolve_location(Settings())
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    weights = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        weights += [
            torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
            attention.o_proj.weight,
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            mlp.down_proj.weight,
        ]
    head = model.lm_head.weight.detach()
    kinds: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
        "ours (Q4_1 layers, Q8_0 head)": [Q4Linear(w) for w in weights] + [Q8Linear(head)],
        "torch's int4 (head float16)": [Int4Linear(w, None) for w in weights] + [Float16Linear(head, None)],
        "fbgemm float16": [Float16Linear(w, None) for w in [*weights, head]],
    }
    shapes = [*weights, head]
    failures = []
    results: dict[int, dict[str, float]] = {}
    for rows in ROWS:
        inputs = [torch.randn(rows, w.shape[1]) for w in shapes]
        # our kernels: each row's bits alone as in the batch, and close to float32
        for layer, x, w in zip(kinds["ours (Q4_1 layers, Q8_0 head)"][-2:], inputs[-2:], shapes[-2:], strict=True):
            batched = layer(x)
            alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
            error = float(((batched - x @ w.float().T).norm(dim=-1) / (x @ w.float().T).norm(dim=-1)).max())
            if not torch.equal(alone, batched) or error > 1e-3:
                failures.append(f"rows {rows}: identical alone {torch.equal(alone, batched)}, error {error:.1e}")
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind, layers in kinds.items():
                started = time.perf_counter()
                for layer, x in zip(layers, inputs, strict=True):
                    layer(x)
                times[kind].append((time.perf_counter() - started) * 1000)
        results[rows] = {kind: statistics.median(values) for kind, values in times.items()}
        print(f"rows {rows}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in results[rows].items()), flush=True)
    names = list(kinds)
    lines = [
        "## The int4 format's kernels (`bench/bench_int4_kernel.py`)",
        "",
        f"On {cpu_description()}, torch threads {torch.get_num_threads()}: milliseconds for every projection",
        f"of one decode step of the default model (30 layers and the LM head), medians of {args.repeats},",
        "interleaved. Ours (inference/kernels/integer_linear.cpp) multiply 4-bit (layers) and 8-bit (LM head) weights",
        "by activations rounded per row to 16 bits, in integers; every row's numbers identical alone and batched.",
        "",
        "| rows | " + " | ".join(f"{name} (ms)" for name in names) + " | ours / float16 |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    for rows, row in results.items():
        cells = " | ".join(f"{row[name]:.2f}" for name in names)
        lines.append(f"| {rows} | {cells} | {row[names[0]] / row[names[2]]:.2f} |")
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
