"""Allocator tuning for processes that move large tensors (shards, workers, bench clients).

Every push and pull allocates and frees buffers of megabytes (protobuf `bytes`, gRPC messages,
numpy receive buffers). glibc serves blocks that large with mmap and gives them back with munmap
on free, so the next push page-faults the same memory in again: on a VM that costs several times
the memcpy itself (measured by `tether bench pushpull`: ~14 ms vs ~2 ms to chunk 16 MiB). Raising
the mmap and trim thresholds keeps freed blocks in the heap for reuse. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20


def tune_allocator() -> bool:
    """Keep large freed blocks for reuse; returns whether the tuning was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    ok &= mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    ok &= mallopt(_M_TOP_PAD, _TOP_PAD)
    return bool(ok)
