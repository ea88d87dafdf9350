"""Host memory for CPU training: keep freed blocks in the process.

A training step on the CPU allocates the same large activations every step (an (N, 768) MLP
output is 11 MiB at a few thousand tokens). glibc's malloc serves a block above its mmap
threshold (128 KiB, raised on the fly up to 32 MiB) with a fresh mapping and unmaps it on free,
and gives the heap's free top back to the kernel; the next step's block is new memory again,
faulted in page by page on its first write, with the kernel zeroing each page. At the
benchmark's training shape that was 20,000-50,000 minor faults and 0.15-0.4 s of system time
a step, and the body's GEMMs, writing into fresh outputs, ran at ~0.75x the rate of the same
GEMMs into reused memory.

`keep_freed_memory()` sets malloc's mmap threshold to 1 GiB and its trim threshold to 2 GiB
(`mallopt`; the in-process form of the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
environment variables): freed blocks go back to the heap and the next step reuses them. What
the process holds then stays at its peak, as a CUDA caching allocator's does. It changes no
result. Where malloc is not glibc's (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc's <malloc.h>
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1                  # mallopt takes an int
OLD_GLIBC_MMAP_MAX = 32 << 20                   # where glibc refuses more (HEAP_MAX_SIZE / 2)

_lock = threading.Lock()
_kept = False


def glibc_malloc() -> bool:
    """Whether this process's malloc is glibc's (Linux with glibc)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def kept() -> bool:
    """Whether `keep_freed_memory` is in effect in this process."""
    return _kept


def keep_freed_memory() -> bool:
    """Have malloc keep freed blocks for reuse instead of returning them to the kernel (see the
    module docstring). Process-wide and idempotent; returns whether it is in effect (False
    where malloc is not glibc's)."""
    global _kept
    with _lock:
        if _kept:
            return True
        if not glibc_malloc():
            return False
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
            mallopt(M_MMAP_THRESHOLD, OLD_GLIBC_MMAP_MAX)
        _kept = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        return _kept
