"""Keep freed tensor memory from lingering in the process (glibc only; a no-op elsewhere).

glibc serves big allocations with mmap, but after freeing one it raises its mmap threshold (up to 32 MB), so the
next ones come from the heap and stay mapped after they are freed. A batch's per-step tensors (tens of MB) then
pile up: peak RSS at 32 clients was 2.34 GB with the default and 1.82 GB with a fixed 1 MB threshold, measured with
bench/bench_server.py's 32-client level.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold at 1 MB (which also stops its dynamic growth). True if it was applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    logger.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, applied)
    return applied
