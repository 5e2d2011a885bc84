"""The C allocator's hold on freed memory, in a training process on long rows.

glibc serves allocations below its mmap threshold from its heap and, by default, raises that threshold
to the size of every large block it frees (up to 32 MiB). A transformer step frees and re-allocates
activations of a few MiB to a few tens of MiB in every layer; after the first few, glibc keeps them on its
heap, where a freed block goes back to the system only when nothing above it is still in use. The process's
resident memory then grows with the longest row rather than with what is alive: SmolLM2-135M's forward over
one 4k-token pair peaked at 3.1-3.8 GiB resident against 2.0 GiB with the threshold fixed at 4 or 8 MiB, its
8k forward at 5.4 GiB against 2.5 (docs/BENCHMARKS.md, section 10).

``return_freed_memory`` fixes the threshold in the calling process, so blocks of ``MMAP_THRESHOLD`` bytes and
more are mapped on their own and unmapped when freed: what ``MALLOC_MMAP_THRESHOLD_`` does at process
start. Mapping costs page faults: a step on short rows (an 11M-parameter model, ~300-900-token pairs) runs 4 %
slower with a 4 MiB threshold and 13 % with 1 MiB, and the 4k forward above 7 % (bench/bench_allocator.py),
so it is applied only once a micro-batch is long enough for memory to count
(``models.ActivationCheckpointing``). A ``MALLOC_MMAP_THRESHOLD_`` in the environment is the user's choice
and is left as it is; other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 4 << 20  # bytes; glibc's own default before it adapts is 128 KiB
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_applied: bool | None = None


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes in this process (once); True when it is fixed
    (here or by ``MALLOC_MMAP_THRESHOLD_``), False where the C library is not glibc."""
    global _applied
    if _applied is not None:
        return _applied
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # glibc read it at start-up: the user's setting stands
        _applied = True
        return True
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no shared C library, or one without mallopt (musl has none)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
    return _applied
