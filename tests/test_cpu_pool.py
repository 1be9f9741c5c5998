"""The CPU memory pool: exact block placement, reuse without growth, correct tensors, pages handed back."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="the pool is built and tested on Linux")

# In a fresh process: the pool is torch's CPU allocator from installation to exit.
PLACEMENT = """
import torch
from tunesmith.train.cpu import pool as cpu_pool
assert cpu_pool.install()
MB = 2**20
def stats():
    s = cpu_pool.stats()
    return [s["in_use"] // 1024, s["span"] // 1024, s["free"] // 1024, s["free_ranges"]]
a, b, c = (torch.empty(MB // 4) for _ in range(3))      # 1 MB each, laid end to end
base = a.data_ptr()
print([b.data_ptr() - base, c.data_ptr() - base], stats())
del b                                                   # a 1 MB hole between a and c
d = torch.empty(MB // 8)                                # 512 KB: into the hole (best fit), not after c
print(d.data_ptr() - base, stats())
e = torch.empty(2 * MB // 4)                            # 2 MB: no hole fits, so after c
print(e.data_ptr() - base, stats())
small = torch.empty(1000)                               # 4 KB: malloc's
print(cpu_pool.stats()["in_use"] // 1024)
del a, c, d, e                                          # all merge back into one empty range
print(stats())
x = torch.ones(100_000)                                # 400 KB rounds up to 448 KB (64 KB grain)
print(stats(), x.data_ptr() - base)
del x
print(cpu_pool.release() // 1024, stats())
"""


def run(script: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_pool_places_blocks_best_fit_and_merges_them_back():
    lines = run(PLACEMENT)
    assert lines[0] == "[1048576, 2097152] [3072, 3072, 0, 0]"
    assert lines[1] == "1048576 [2560, 3072, 512, 1]"             # the hole's first half; its rest stays free
    assert lines[2] == "3145728 [4608, 5120, 512, 1]"             # after c: the span grows to 5 MB
    assert lines[3] == "4608"                                     # the 4 KB tensor did not come from the pool
    assert lines[4] == "[0, 5120, 0, 0]"                          # everything merged; pages stay for reuse
    assert lines[5] == "[448, 5120, 0, 0] 0"                      # reused from the start of the range
    assert lines[6] == "5120 [0, 0, 0, 0]"                        # release hands the 5 MB back


# 200 big blocks interleaved with small live ones (as autograd metadata is), freed, then a round of bigger
# blocks, resident memory measured while each round is alive. With glibc's mmap threshold at its 32 MB ceiling
# (where freed activations push it in training), the heap cannot merge the freed blocks across the small ones and
# grows by the whole second round; the pool merges them and grows only by the difference.
REUSE = """
import ctypes, ctypes.util, sys, torch
from tunesmith.train.cpu import pool as cpu_pool
if sys.argv[1] == "pool":
    assert cpu_pool.install()
else:
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
small, grown = [], []
for size in (2**20, 2**20 + 2**19):
    before = rss()
    big = []
    for _ in range(200):
        big.append(torch.ones(size // 4))
        small.append(torch.ones(2**14))  # 64 KB: malloc's, and too big for the holes left by imports
    assert all(float(t.sum()) == t.numel() for t in big)
    grown.append(rss() - before)
    del big
print(*grown)
"""


def test_pool_reuses_freed_blocks_where_a_fragmented_heap_grows():
    pool_first, pool_second = map(float, run(REUSE, "pool")[-1].split())
    heap_first, heap_second = map(float, run(REUSE, "malloc")[-1].split())
    # each round also keeps its 200 small tensors: 12.5 MB
    assert 205 < pool_first < 230 and 105 < pool_second < 130, (pool_first, pool_second)
    assert 205 < heap_first < 230 and heap_second > 290, (heap_first, heap_second)


PROFILED = """
import torch
from tunesmith.train.cpu import pool as cpu_pool
assert cpu_pool.install()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
    x = torch.ones(2**20)          # 4 MB: the pool's
    y = torch.ones(2**10)          # 4 KB: malloc's
    del x, y
events = {e.key: e.cpu_memory_usage for e in prof.key_averages()}
print(events["aten::empty"], events["[memory]"])
"""


def test_pool_allocations_show_in_the_profiler():
    allocated, released = map(int, run(PROFILED)[-1].split())
    assert allocated == 4 * 2**20 + 4 * 2**10 and released == -allocated


def test_cpu_training_uses_the_pool_and_reports_it(tmp_path, tiny_model_dir):
    """On the CPU the pool is on by default, and its peak is reported beside the process's peak RSS."""
    import json

    from conftest import write_dataset
    from tunesmith.cli import main

    rows = [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))} for i in range(8, 40)]
    write_dataset(tmp_path / "data", "count", rows)
    assert main(["train", f"model_name_or_path={tiny_model_dir}", f"dataset_dir={tmp_path / 'data'}",
                 "dataset=count", "template=chatml", "cutoff_len=128", "per_device_train_batch_size=8",
                 "max_steps=2", "save_strategy=no", "disable_tqdm=true", f"output_dir={tmp_path / 'out'}",
                 f"data_cache_dir={tmp_path / 'cache'}"]) == 0
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert 0 < results["train_cpu_pool_peak_mb"] <= results["train_cpu_pool_span_mb"] < results["train_peak_rss_mb"]


NO_COMPILER = """
import logging, torch
import torch.utils.cpp_extension as cpp_extension
def no_compiler(*args, **kwargs):
    raise RuntimeError("Error building extension: c++: not found")
cpp_extension.load = no_compiler
logging.basicConfig(level=logging.WARNING)
from tunesmith.train.cpu import pool as cpu_pool
print(cpu_pool.install(), cpu_pool.stats(), cpu_pool.release(), float(torch.ones(2**20).sum()))
"""


def test_without_a_compiler_training_falls_back_to_malloc_with_a_warning():
    out = subprocess.run([sys.executable, "-c", NO_COMPILER], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "None", "0", "1048576.0"]
    assert "CPU memory pool could not be built (RuntimeError: Error building extension: c++: not found)" in out.stderr
