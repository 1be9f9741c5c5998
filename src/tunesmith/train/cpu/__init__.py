"""Everything CPU training does differently, behind one profile (see train/profile.py).

- `start`: one malloc arena when passes run on threads (heap.py) and the memory pool for large tensors
  (pool.py), both before the model is built;
- `prepare`: the pass runner (parallel_passes.py when `parallel_passes` > 1) and the thread governor
  (threads.py) that follows the cores other processes leave free;
- `before_pass`: with `trim_cpu_heap`, free pages handed back to the OS;
- `shape_bucket`: half-precision rows rounded to 64 tokens, since bf16/fp16 CPU kernels keep compiled code for
  every shape they meet;
- `memory`: the pool's peak and span for the results.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tunesmith.config.loader import ConfigError
from tunesmith.model.attention import HALF_PRECISION_BUCKET
from tunesmith.train.cpu import heap, pool
from tunesmith.train.cpu.parallel_passes import ParallelPasses
from tunesmith.train.cpu.threads import make_governor
from tunesmith.train.profile import Profile

log = logging.getLogger("tunesmith.train")


class CPUProfile(Profile):
    name = "cpu"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.governor = None

    @property
    def shape_bucket(self) -> int:
        t = self.cfg.training  # read when asked: setup may turn bf16 off on a CPU without native bf16
        return HALF_PRECISION_BUCKET if t.bf16 or t.fp16 else 1

    def start(self) -> None:
        t = self.cfg.training
        if t.parallel_passes > 1:
            heap.share_one_malloc_arena()
        if t.cpu_memory_pool:
            pool.install()

    def prepare(self, setup: Any) -> Any:
        t, acc = self.cfg.training, setup.accelerator
        self.governor = make_governor(acc.device.type, acc.num_processes, t.parallel_passes)
        if t.parallel_passes <= 1:
            return super().prepare(setup)
        problems = [why for why, bad in (
            (f"{acc.num_processes} processes run", acc.num_processes > 1),
            ("a gradient scaler (fp16) is in use", getattr(acc, "scaler", None) is not None),
            ("DeepSpeed/FSDP owns the backward", setup.stepper.owns_backward)) if bad]
        if problems:
            raise ConfigError([f"`parallel_passes: {t.parallel_passes}` runs passes on the threads of one CPU "
                               f"process, but {', '.join(problems)}: set `parallel_passes: 1`"])
        log.info("parallel_passes: %d passes at a time, %d threads each", t.parallel_passes,
                 max(1, torch.get_num_threads() // t.parallel_passes))
        return ParallelPasses(t.parallel_passes, setup.data.train.lengths, t.max_tokens_per_forward,
                              setup.stepper.trainable)

    def before_pass(self) -> None:
        if self.cfg.training.trim_cpu_heap:
            heap.release_free_heap()

    def after_step(self) -> None:
        if self.governor is not None:
            self.governor.after_step()

    def memory(self) -> dict[str, float]:
        stats = pool.stats()
        if stats is None:
            return {}
        # the tensors' share of the RSS: peak bytes in use, and the pool's resident span
        return {"train_cpu_pool_peak_mb": round(stats["peak_in_use"] / 2**20, 1),
                "train_cpu_pool_span_mb": round(stats["span"] / 2**20, 1)}
