"""What the benchmarks say about the machine they ran on: its CPU and how fast it reads memory."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

# The instruction sets that decide which kernels are fast: AVX2 (fbgemm int8/fp16), AVX-512 and AMX (bfloat16).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


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
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}, {summary}"


def memory_bandwidth_gb_s() -> float:
    """How fast torch reads memory here: the median of a few sums over 256 MiB (what decoding does to weights)."""
    import torch

    data = torch.ones(64 * 2**20, dtype=torch.float32)
    timings = []
    for _ in range(7):
        started = time.perf_counter()
        data.sum()
        timings.append(time.perf_counter() - started)
    return round(data.numel() * 4 / statistics.median(timings) / 1e9, 2)
