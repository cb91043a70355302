"""The process heap (glibc's malloc) during calibration.

glibc serves a large allocation with an mmap of its own, returned to the system when freed, but
only above its mmap threshold, and it raises that threshold to the size of each mapped block that
is freed (up to 32 MiB). After the first activation of a forward is freed, the next ones of that
size come from the heap instead, whose freed pages stay with the process until `malloc_trim`, and
which fragments around the small tensors (observers' ranges, statistics) allocated between them.
Measured on a ViT-L/14-size model in memory (benchmarks/calibration_memory.py), that made the
calibration peak vary from 2.2 to 3.5 GB between identical processes.

`keep_large_allocations_mapped` fixes the threshold, so every large tensor is an mmap returned on
free, and `return_freed_memory` hands what the heap keeps back after each batch and block. Both
change the whole process: the CLI calls the first for its own process; an application calling
the Python API decides for itself (README). Elsewhere than glibc there is nothing to do, and both
say so by returning False."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# glibc's own starting threshold (128 KiB): every activation-sized block stays an mmap of its own
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def _load_glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_GLIBC = _load_glibc()


def keep_large_allocations_mapped(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (module docstring)."""
    if _GLIBC is None:
        log.debug("not glibc: the allocator's mmap threshold is left as it is")
        return False
    return bool(_GLIBC.mallopt(_M_MMAP_THRESHOLD, threshold))


def return_freed_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc's malloc_trim): one batch's or one
    block's tensors, not the heap's high-water mark, stay with the process."""
    if _GLIBC is None:
        return False
    _GLIBC.malloc_trim(0)
    return True
