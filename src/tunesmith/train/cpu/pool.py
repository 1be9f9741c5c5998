"""A memory pool for the large tensors of CPU training.

PyTorch has a caching allocator for GPUs but none for the CPU, where tensors come from glibc's malloc. glibc keeps
freed memory in one contiguous heap, and the small long-lived allocations of torch and Python land between the big
activation blocks of a pass; each pass of another length carves new space, so the heap grows to several times its
live bytes, and trimming it between passes costs the time of re-faulting the pages.

This pool serves every CPU tensor of 256 KB or more from a range of its own: best fit, free neighbours merged,
pages kept resident for the next pass (no page faults once warm), so its span stays close to the live peak (the
measurements are in benchmarks/LOG.md). It plugs in through c10's allocator hook (`c10::SetCPUAllocator`); the
C++ source beside this file is compiled once per torch version by `torch.utils.cpp_extension` (a C++ compiler is
needed; without one training falls back to malloc with a warning).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("pool.cpp")
_THRESHOLD = 256 << 10  # below this, malloc's small-object bins do well and a 64 KB grain would waste
_installed = False


@functools.lru_cache(maxsize=1)
def _library() -> Any:
    """The compiled pool (built on first use, cached by torch's extension builder), or None with a warning."""
    try:
        from torch.utils.cpp_extension import load

        path = load(name="tunesmith_cpu_pool", sources=[str(_SOURCE)], extra_cflags=["-O2"],
                    is_python_module=False, verbose=False)
        lib = ctypes.CDLL(path)
    except Exception as error:  # no compiler, no ninja, read-only cache: training still works, with malloc
        log.warning("tunesmith's CPU memory pool could not be built (%s: %s); using malloc, whose heap fragments "
                    "(higher peak RSS). Install a C++ compiler, or set cpu_memory_pool: false to silence this.",
                    type(error).__name__, str(error).strip().splitlines()[-1] if str(error).strip() else "")
        return None
    lib.tunesmith_pool_install.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    lib.tunesmith_pool_release.restype = ctypes.c_size_t
    lib.tunesmith_pool_stats.argtypes = [ctypes.POINTER(ctypes.c_size_t)]
    return lib


def install() -> bool:
    """Make the pool torch's CPU allocator for the rest of the process (tensors allocated before keep their
    own deleters). Idempotent; False where it could not be built."""
    global _installed
    if _installed:
        return True
    lib = _library()
    if lib is None:
        return False
    reserve = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # address space only, nothing committed
    if lib.tunesmith_pool_install(reserve, _THRESHOLD) != 0:
        log.warning("tunesmith's CPU memory pool could not reserve %d MB of address space; using malloc",
                    reserve >> 20)
        return False
    _installed = True
    return True


def release() -> int:
    """Hand the pool's free pages back to the OS (with `trim_cpu_heap`); the bytes released."""
    return _library().tunesmith_pool_release() if _installed else 0


def stats() -> dict[str, int] | None:
    """Bytes in use now and at the peak, the resident span and free bytes within it; None when not installed."""
    if not _installed:
        return None
    out = (ctypes.c_size_t * 5)()
    _library().tunesmith_pool_stats(out)
    return {"in_use": out[0], "peak_in_use": out[1], "span": out[2], "free": out[3], "free_ranges": out[4]}
