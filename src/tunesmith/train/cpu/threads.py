"""CPU training beside other busy processes: compute threads follow the cores that are actually free.

PyTorch's OpenMP threads spin while they wait for each other. When another process keeps a core busy, a
thread that lost its core holds up every parallel region, and the spinning ones take time from the other
process in turn: a small model's steps can take several times longer than alone. Once per step (at most once
per `WINDOW_S` of wall time) this reads the machine's busy time from /proc/stat, subtracts this process's own,
and sets the thread count to the cores the others leave free; when they go idle again the threads come back.
Passive waiting (OMP_WAIT_POLICY=PASSIVE) avoids the fight too but makes every parallel region pay a wake-up,
which costs small models much of their speed on an idle machine. Settings the user made (OMP_NUM_THREADS,
OMP_WAIT_POLICY, torch.set_num_threads before training) win: the governor is then off.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger("tunesmith.train")
WINDOW_S = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine() -> tuple[float, int] | None:
    """(busy CPU seconds of the whole machine, number of CPUs), or None where /proc/stat is unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    values = [int(v) for v in lines[0].split()[1:9]]
    busy = sum(values) - values[3] - values[4]  # all but idle and iowait
    cpus = sum(1 for l in lines if l.startswith("cpu") and l[3:4].isdigit())
    return busy / CLOCK_TICKS, cpus


class ThreadGovernor:
    def __init__(self) -> None:
        self.most = torch.get_num_threads()
        self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        machine = _machine()
        if machine is None:
            return None
        times = os.times()
        return time.monotonic(), machine[0], times.user + times.system

    def free_cores(self, other_busy: float, cpus: int) -> int:
        """Cores left by the others (a core counts as taken when more than half busy), within 1..most."""
        return max(1, min(self.most, cpus - int(other_busy + 0.5)))

    def after_step(self) -> None:
        now = self._sample()
        if now is None or self.last is None or now[0] - self.last[0] < WINDOW_S:
            return
        wall = now[0] - self.last[0]
        other = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / wall
        self.last = now
        machine = _machine()
        threads = self.free_cores(other, machine[1] if machine else self.most)
        if threads != torch.get_num_threads():
            log.info("CPU threads: %d -> %d (other processes keep %.1f cores busy)", torch.get_num_threads(),
                     threads, other)
            torch.set_num_threads(threads)


def make_governor(device_type: str, processes: int, parallel_passes: int) -> ThreadGovernor | None:
    """Only for one training process on a CPU whose threads the user left to tunesmith."""
    user_set = any(k in os.environ for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS"))
    if device_type != "cpu" or processes > 1 or parallel_passes > 1 or user_set or _machine() is None:
        return None
    return ThreadGovernor()
