"""Host-memory reuse for CPU training: keep freed activation memory in the process.

    from kubellm.training.hostmem import keep_freed_memory
    keep_freed_memory()   # build_engine does this on CPU when train.host_memory_reuse is true

A CPU training step allocates and frees the same activation tensors every step. glibc's malloc, by
default, serves blocks above a moving threshold (128 KiB, rising to at most 32 MiB as big blocks are
freed) with `mmap` and hands the top of the heap back to the kernel once more than twice that is
free. Each step then faults its activations back in, one zero-filled 4 KiB page at a time (~2.5 µs
per page on the benchmark machine). On the `seed` preset that is ~12,000 page faults, ~50 MB, per
step. The two settings below stop it: every block up to glibc's 32 MiB cap comes from the heap, and
the heap is not trimmed (below 2 GiB free), so the step reuses the pages it faulted in the first
time (0–400 faults per step). The process keeps its peak heap for its whole life, which is what a
training worker wants anyway.

Both settings are needed. Either one alone turns glibc's moving threshold off and pins it at
128 KiB, which makes things far worse (measured on `seed`: 100,000–150,000 faults per step and
1.4–1.6× slower steps). This is glibc-only. On musl or macOS nothing is changed and the call returns
False. The MALLOC_*_ environment variables, when the operator set them, win: nothing is overridden.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's cap on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger values are refused
TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: the heap's top is trimmed only past 2 GiB free
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to its 32 MiB cap and turn heap trimming off, once per process.
    Returns True when the settings are in effect (now or from an earlier call), False where they do
    not apply (not glibc, or the operator tuned malloc through MALLOC_*_ environment variables)."""
    global _applied
    if _applied:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    preset = [k for k in _ENV if k in os.environ]
    if preset:
        log.info("host malloc left as configured by %s", ", ".join(preset))
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the mmap threshold first: setting either one freezes glibc's moving threshold where it is
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX):
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) refused; host malloc left at its defaults", MMAP_THRESHOLD_MAX)
        return False
    if not mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        log.warning("mallopt(M_TRIM_THRESHOLD) refused; the heap may still be trimmed")
    _applied = True
    return True
