"""Host memory: glibc malloc tuning for CPU training (`utils.init_distributed` applies it)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    PyTorch's CPU tensors come straight from malloc; glibc serves large blocks (all above 32 MiB: the
    word embedding's gradient, the 65536-column ITC queues, ...) with mmap and unmaps them on free, so
    every step page-faults them in again: at full size a quarter of the CPU step was kernel time. Without
    mmap and without trimming, freed blocks stay in the heap: the step ran 1.2x faster at batch 4 and
    1.9x at batch 64, for about the same peak memory at batch 4 and +1-2 GiB of fragmentation at batch
    64 (docs/performance.md). ALBEF_KEEP_FREED_MEMORY=0 leaves malloc alone. Returns False where
    nothing changed (that, or no glibc: macOS, musl).
    """
    if os.environ.get("ALBEF_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, TypeError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))  # -1: never trim
