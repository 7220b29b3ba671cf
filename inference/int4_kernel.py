"""Builds the int4 format's own kernel (kernels/int4_linear.cpp): 4-bit weights times 16-bit activations, in integers.

Built from source with torch's C++ extension tooling the first time it is needed (about 10 s; needs g++ and ninja)
and kept in torch's extension cache, so later starts only load it. Where it can't be built (no compiler, no AVX2),
`load` says why and int4 falls back to torch's own 4-bit kernel (quantization.Int4Linear). The layer that calls it is
quantization.Int4Int16Linear.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "int4_linear.cpp"
# -fopenmp: at::parallel_for splits work across threads only when compiled with it (else it runs on one); at run
# time the extension shares the libgomp torch has already loaded (same soname), so one thread team serves both
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fopenmp"]


@functools.cache
def load() -> str | None:
    """Build (once per machine and torch) and register torch.ops.llm_serving.int4_linear; None when it is ready,
    else why it is not."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load as build

        build(
            name="llm_serving_int4",
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (OSError, RuntimeError, ImportError, ValueError) as exc:  # no compiler, no ninja, a failed build
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"its kernel could not be built here ({first_line})"
    logger.info("int4 kernel ready in %.1f s", time.perf_counter() - started)
    return None
