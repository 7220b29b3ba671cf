"""Keep freed memory from lingering in the process (glibc only; no-ops elsewhere).

Under many concurrent clients glibc kept freed per-step tensors mapped, so peak RSS climbed well past what the KV
cache and the weights need (figures: the README's "Memory" section and docs/benchmarks.md):
- after freeing a big block glibc raises its mmap threshold (up to 32 MB), so later blocks come from its heaps and stay
  there once freed: fixing the threshold at 1 MB keeps big blocks mapped on their own and returned when freed;
- the heaps fragment between prefills (activations of every size come and go): returning their free pages after each
  prefill lowers the peak at the same throughput.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018  # only glibc has these two
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    return libc


def return_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold at 1 MB (which also stops its dynamic growth). True if it was applied."""
    libc = _glibc()
    if libc is None:
        return False
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    logger.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, applied)
    return applied


def release_free_heap_pages() -> bool:
    """Give the free pages inside glibc's heaps back to the OS (malloc_trim). True if any were released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
