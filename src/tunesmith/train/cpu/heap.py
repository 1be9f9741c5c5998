"""glibc's heap on the CPU: one malloc arena for every thread, and free pages handed back between passes."""

from __future__ import annotations

import functools
from typing import Any

from tunesmith.train.cpu import pool


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    """The C library through ctypes, or None where it is not glibc (no mallopt / malloc_trim)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_heap() -> None:
    """Hand free pages back to the OS: the CPU memory pool's, then glibc's heap's (malloc_trim). With
    `trim_cpu_heap`, called on the CPU before each pass, when the previous pass's activations are all freed.
    It lowers peak RSS at the cost of re-faulting the pages in the next pass, hence off by default (figures in
    benchmarks/LOG.md)."""
    pool.release()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def share_one_malloc_arena() -> bool:
    """Ask glibc to serve every thread from one heap (mallopt M_ARENA_MAX = 1). By default each worker thread gets
    its own arena, and each keeps the free space of its freed activations to itself (a higher peak RSS at the same
    speed, see benchmarks/LOG.md). Called before any other thread allocates (tokenizer and OpenMP threads take
    arenas of their own, which the workers would then share instead). A no-op where the C library is not glibc."""
    libc = _glibc()
    m_arena_max = -8  # from glibc's malloc.h
    return libc is not None and bool(libc.mallopt(m_arena_max, 1))
