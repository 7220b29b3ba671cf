"""What the benchmarks say about the machine they ran on: its CPU and how fast it reads memory."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

# The instruction sets that decide which kernels are fast: AVX2 (fbgemm int8/fp16), AVX-512 and AMX (bfloat16).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
# What makes a newer x86 CPU run the kernels an AVX2-only one (a free CPU Space) runs: torch's own vectorized ops,
# fbgemm (int8 and float16 GEMMs), oneDNN and MKL each take a cap on the instruction sets they use. Clock and memory
# speed stay this machine's.
AVX2_CAPS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def cap_kernels_at_avx2() -> None:
    """Set AVX2_CAPS for this process and the servers it starts (before torch is first used)."""
    os.environ.update(AVX2_CAPS)


def cpu_description() -> str:
    """e.g. "AMD EPYC, 2 cores, x86_64, AVX2 (no AVX-512, no AMX)"."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    present = [flag for flag in FLAGS if flag in flags]
    absent = [name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_bf16")) if flag not in flags]
    summary = ", ".join(flag.upper() for flag in present) or "no AVX2"
    if absent:
        summary += " (no " + ", no ".join(absent) + ")"
    capped = [f"{name}={value}" for name, value in AVX2_CAPS.items() if os.environ.get(name) == value]
    if capped:
        summary += "; kernels capped at AVX2 (" + " ".join(capped) + ")"
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}, {summary}"


def memory_bandwidth_gb_s(repeats: int = 7) -> float:
    """How fast torch reads memory here: the median of `repeats` sums over 256 MiB (what decoding does to weights)."""
    import torch

    data = torch.ones(64 * 2**20, dtype=torch.float32)
    data.sum()  # touched once first: a fresh tensor's first read also maps its pages
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        timings.append(time.perf_counter() - started)
    return round(data.numel() * 4 / statistics.median(timings) / 1e9, 2)
