"""Builds our integer kernels (kernels/integer_linear.cpp): 4-bit (Q4_1) and 8-bit (Q8_0) weights times 16-bit
activations, multiplied in integers on AVX2.

Built from source with torch's C++ extension tooling the first time it is needed (about 10 s; needs g++ and ninja)
and kept in torch's extension cache, so later starts only load it. Where it can't be built (no compiler, no AVX2),
`load` says why and int4 falls back to torch's own 4-bit kernel (quantization.Int4Linear). The layers that call them
are quantization.Q4Linear and Q8Linear.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "integer_linear.cpp"
# -fopenmp: at::parallel_for splits work across threads only when compiled with it (else it runs on one); at run
# time the extension shares the libgomp torch has already loaded (same soname), so one thread team serves both
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fopenmp"]


@functools.cache
def load() -> str | None:
    """Build (once per machine and torch) and register torch.ops.llm_serving.q4_1_linear and q8_0_linear; None when
    they are ready, else why they are not."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load as build

        build(
            name="llm_serving_integer_linear",
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (OSError, RuntimeError, ImportError, ValueError) as exc:  # no compiler, no ninja, a failed build
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"our kernels could not be built here ({first_line})"
    logger.info("Integer kernels ready in %.1f s", time.perf_counter() - started)
    return None
