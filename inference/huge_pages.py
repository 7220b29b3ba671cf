"""Our kernels' weights on transparent huge pages (2 MiB), where the OS offers them.

Why: every decode step streams all the int4 weights and the 8-bit head once (~100 MB for SmolLM2). On 4 KiB pages that
is ~25,000 pages a step, and each TLB miss is a page walk (in a virtual machine, such as a Space's, a two-level one).
In one mapping advised MADV_HUGEPAGE they take ~50 pages, and the int4 step at batch 1 measured ~5% faster
(docs/benchmarks.md). Only where the weights live changes: the same bits, the same numbers.

Linux decides: with transparent huge pages set to `madvise` or `always` the mapping gets them, with `never` it keeps
4 KiB pages and nothing else changes.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import torch

HUGE_PAGE = 2 << 20
LINE = 64  # each tensor starts on a cache line of its own


def move_to_huge_pages(tensors: Sequence[torch.Tensor]) -> int:
    """Copy `tensors` (CPU, contiguous) into one mapping advised for huge pages, and point each at its copy
    (Tensor.set_: every module that holds the tensor reads the copy; the old memory goes when nothing else holds it).
    Tensors that share memory share one copy. Returns the bytes moved: 0 where this OS has no such advice."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not hasattr(mmap, "MAP_PRIVATE") or not tensors:
        return 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("only contiguous CPU tensors can move to huge pages")
    # one copy per piece of memory: a tied head and embedding table are the same bytes in two tensors
    by_memory: dict[tuple[int, int, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        by_memory.setdefault((tensor.data_ptr(), tensor.numel(), tensor.dtype), []).append(tensor)
    sizes = [group[0].numel() * group[0].element_size() for group in by_memory.values()]
    total = sum(-(-size // LINE) * LINE for size in sizes)
    # private and anonymous: a shared anonymous mapping is shmem, which the anonymous-memory setting doesn't cover
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(advice)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` open for as long as any copy lives
    offset = -whole.data_ptr() % HUGE_PAGE  # the first tensor starts on a huge page's boundary
    with torch.no_grad():
        for group, size in zip(by_memory.values(), sizes, strict=True):
            copy = whole[offset : offset + size].view(group[0].dtype)
            copy.copy_(group[0].reshape(-1))
            for tensor in group:  # each keeps its own shape
                tensor.set_(copy.view(tensor.shape))  # type: ignore[call-overload]  # documented; the stubs miss it
            offset += -(-size // LINE) * LINE
    return total
