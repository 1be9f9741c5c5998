"""The heap release called between training passes on the CPU really returns freed pages to the OS."""

import ctypes.util
import platform
import subprocess
import sys

import pytest

# In a fresh process, so that the blocks come from the main thread's heap whatever earlier tests left behind:
# 1 MB blocks (glibc's mmap threshold pinned to its 32 MB ceiling, where freed activations have already pushed
# it in training), every other one then freed: the freed ones are holes between live blocks, which the heap
# cannot give back by shrinking, so about 100 MB of free pages stay resident until they are released.
SCRIPT = """
import ctypes, ctypes.util, torch
from tunesmith.train.cpu.heap import release_free_heap
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
blocks = [torch.ones(2**20 // 4 - 64) for _ in range(200)]
del blocks[::2]
before = rss()
release_free_heap()
print(before, rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or "libc" not in (ctypes.util.find_library("c") or ""),
                    reason="glibc only")
def test_release_free_heap_returns_fragmented_free_pages():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split()[-2:])
    assert after < before - 50, f"about 100 MB of freed pages should have left the resident set: {before} -> {after}"
