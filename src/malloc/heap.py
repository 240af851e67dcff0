"""Keep freed memory in the process heap, so large tensors are not page-faulted in on every allocation.

glibc's malloc serves a request above its mmap threshold (adaptive, at most 32 MiB) with a fresh ``mmap`` and
unmaps it on ``free``; the kernel then zero-fills the next such tensor page by page as it is first written.
Attention over 1,024-event training windows allocates dozens of 32-128 MiB temporaries per step (a
``(B, H, T, T)`` float tensor of 8 x 4 x 1,024 x 1,024 is 128 MiB), so a CPU training step spent more time in the
kernel than in torch. :func:`retain_freed_memory` turns ``mmap`` off for the heap and never trims it: freed
blocks are reused as they are. The cost is that the resident size stays at its peak until the process exits,
which is what a training or benchmark process reaches anyway. ``benchmarks/heap.py`` measures both settings
(docs/BENCHMARKS.md, "The heap").

The ``malloc`` command calls it once at start; the library never does (a program that embeds MALLOC keeps its
own allocator settings). It changes no number a model computes, only where freed memory goes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt(3) parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB - 1 of free top-of-heap is kept (in practice, all)


def retain_freed_memory() -> bool:
    """Ask glibc to serve every allocation from the heap and keep freed memory there.

    Returns:
        True when both settings were applied; False where the C library is not glibc (other allocators, e.g.
        macOS's or musl's, are left as they are) or glibc refused one.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = libc.mallopt(M_MMAP_MAX, 0) == 1
    applied = libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1 and applied
    return applied
