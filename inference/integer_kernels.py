"""Builds our C++ kernels, one library: the integer kernels (kernels/integer_linear.cpp: 4-bit Q4_1 and 8-bit Q8_0
weights times 16-bit activations, multiplied in integers on AVX2), the decode step's attention
(kernels/decode_attention.cpp: each row over its own keys, float16 or float32) and, built on both, an int4 decoder
layer's whole decode step in one call (kernels/decode_layer.cpp).

Built from source with torch's C++ extension tooling the first time it is needed (about 10 s; needs g++ and ninja)
into torch's extension cache (`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions), so later starts only
load the library. Where it can't be built (no compiler, no AVX2), `load` says why and int4 falls back to torch's own
4-bit kernel (quantization.Int4Linear) and the decode step keeps torch's attention. They are called by
quantization.Q4Linear and Q8Linear and by fast_llama.KernelAttention and Q4DecoderLayer.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import subprocess
import time
from pathlib import Path

import torch
from filelock import FileLock

logger = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
SOURCES = [KERNELS / name for name in ("integer_linear.cpp", "decode_attention.cpp", "decode_layer.cpp")]
# what they include: part of what a build's folder is keyed by
HEADERS = [KERNELS / "kernels.h"]
# -fopenmp: at::parallel_for splits work across threads only when compiled with it (else it runs on one); at run
# time the extension shares the libgomp torch has already loaded (same soname), so one thread team serves both
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fopenmp"]
NAME = "llm_serving_integer_linear"


def build_folder() -> Path:
    """Where this source, these flags and this torch build their library: one folder each, so a changed kernel is
    never loaded from an older build."""
    # torch's own choice of folder (TORCH_EXTENSIONS_DIR, else per user, Python and device kind); it creates it
    from torch.utils.cpp_extension import _get_build_directory

    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(source + " ".join([*FLAGS, torch.__version__]).encode()).hexdigest()[:16]
    return Path(_get_build_directory(f"{NAME}-{key}", verbose=False))


def cpu_has_avx2() -> bool:
    """The kernels' one requirement of the CPU, as torch sees it (ATEN_CPU_CAPABILITY caps it)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _build(library: Path) -> None:
    """Compile and link `library` and load it. torch's tooling guards a build with a lock file that a
    killed build leaves behind, after which every later start would wait for it forever; so builds take a lock of
    our own, which the OS frees when its holder dies, and clear a leftover one under it."""
    from torch.utils.cpp_extension import load as build

    folder = library.parent
    with FileLock(str(folder / "build.lock")):
        try:
            torch.ops.load_library(str(library))  # type: ignore[no-untyped-call]  # built by the one we waited for
            return
        except OSError:  # missing, or left broken by a build killed mid-link
            library.unlink(missing_ok=True)
        (folder / "lock").unlink(missing_ok=True)
        build(
            name=NAME,
            sources=[str(path) for path in SOURCES],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
        )


@functools.cache
def load() -> str | None:
    """Build (once per machine, source and torch) and register torch.ops.llm_serving.q4_1_linear, q8_0_linear,
    decode_attention and q4_decode_layer; None when they are ready, else why they are not."""
    if not cpu_has_avx2():
        return f"this CPU has no AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    started = time.perf_counter()
    folder = build_folder()
    library = folder / f"{NAME}.so"
    try:
        try:
            torch.ops.load_library(str(library))  # type: ignore[no-untyped-call]  # built before: no toolchain
        except OSError:  # not built yet (or being built, or broken)
            _build(library)
    except (OSError, RuntimeError, ImportError, ValueError, subprocess.SubprocessError) as exc:
        # no compiler, no ninja, a failed build: the caller falls back and says why
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"our kernels could not be built here ({first_line})"
    logger.info(
        "Our kernels (integer linear, decode attention, decode layer) ready in %.1f s (%s)",
        time.perf_counter() - started,
        folder,
    )
    return None
