"""Keep resident memory flat over long runs: glibc's malloc told not to hoard freed pages.

Decoding thousands of JPEGs allocates and frees large, oddly sized buffers (the file, the
decoded pixels, the resized copy) between the model's own allocations. glibc's malloc keeps
freed pages in per-thread arenas, and its dynamic thresholds move such buffers from mmap onto
those heaps after the first free, so resident memory climbs with the number of images although
nothing leaks (flat under ``MALLOC_ARENA_MAX=1 MALLOC_TRIM_THRESHOLD_=0``; measured:
benchmarks/RESULTS.md, section "Resident memory over the image set (bench_memory.py)").
:func:`tame` sets the same two knobs from inside the process, through ``mallopt``, the first time
an engine decodes a batch (benchmarks/bench_memory.py measures images against RSS with and
without it). Other C
libraries (musl, macOS) have no ``mallopt`` and need none: a no-op there. Opt out with
``PROBEKIT_MALLOC_TUNE=0`` (then glibc's own ``MALLOC_*`` variables apply as usual).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = ["tame"]

_M_TRIM_THRESHOLD, _M_ARENA_MAX = -1, -8  # glibc <malloc.h>


@functools.lru_cache(maxsize=1)
def tame() -> bool:
    """One malloc arena, heap tops trimmed on free (once per process); True if glibc took it."""
    if os.environ.get("PROBEKIT_MALLOC_TUNE", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_ARENA_MAX, 1)) and bool(mallopt(_M_TRIM_THRESHOLD, 0))
