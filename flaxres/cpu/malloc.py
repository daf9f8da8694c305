"""glibc malloc settings under which XLA:CPU reuses a step's memory instead of faulting it in anew.

XLA:CPU mallocs each executable's temporary buffer once per call (≈ 290 MB for a ResNet-20 train
step at batch 128), on a thread of its own pool. glibc serves a request that large with a fresh
``mmap``: a thread's non-main arena holds at most 64 MB, and the main arena's mmap threshold stops
adapting at 32 MB. So every step page-faults its whole working set in again, spending a large
share of the step in the kernel (docs/performance.md). PyTorch pays less: its tensors are
allocated one by one, most of them below the adaptive threshold.

One arena and thresholds above any step's size keep the freed block in the heap for the next
call. The settings are process-wide, so the command-line tools apply them (both frameworks alike in
``bench.speed``); the library never does so on import.
"""

from __future__ import annotations

import ctypes

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
_LARGEST = 2**31 - 1  # mallopt takes an int


def retain_freed_memory() -> bool:
    """One malloc arena, no mmap below 2 GiB and no trimming below 2 GiB, for this process.

    Call it before the first JAX computation: a thread keeps the arena of its first malloc, and
    XLA's pool threads start with the CPU backend. Returns whether the C library took all three
    settings (False where there is no glibc ``mallopt``, e.g. macOS or musl; nothing changes then).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, _LARGEST), (M_TRIM_THRESHOLD, _LARGEST)))
