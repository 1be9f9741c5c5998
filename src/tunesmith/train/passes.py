"""How one optimizer step's samples become forward+backward passes, and how the passes run.

The loop asks its pass runner for a `PassPlan` of the step's units (a unit: one sample, or packed samples) and
hands it back, turned into batches, to be run. `SerialPasses` runs one pass after another on the device; the CPU
profile can swap in `cpu.parallel_passes.ParallelPasses`, which runs groups of passes side by side on threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from tunesmith.data.batching import pack_by_tokens


@dataclass
class PassResult:
    metrics: list[dict[str, torch.Tensor]]                # one dict per pass, weighted
    grads: list[torch.Tensor | None] | None = None        # summed gradients, when asked to collect them


@dataclass
class PassPlan:
    """Passes run one at a time on the whole device (`serial`), then `groups` run side by side (one per worker,
    each in order); each pass is a list of units, or, once mapped, a (batch, weight) pair."""

    serial: list[Any]
    groups: list[list[Any]] = field(default_factory=list)

    def map(self, fn: Callable[[Any], Any]) -> "PassPlan":
        return PassPlan([fn(p) for p in self.serial], [[fn(p) for p in group] for group in self.groups])

    def every(self) -> list[Any]:
        return self.serial + [p for group in self.groups for p in group]


# (passes, collect_grads) -> PassResult: the loop's forward+backward over a list of (batch, weight)
RunPasses = Callable[[list[Any], bool], PassResult]


class SerialPasses:
    """The step's units packed into as few passes of at most `max_tokens_per_forward` tokens as possible (no
    budget: one pass per micro-batch); every rank runs as many passes (empty ones run with weight 0), so the
    collectives of DeepSpeed and DDP stay in step."""

    def __init__(self, lengths: np.ndarray, budget: int, accelerator: Any):
        self.lengths, self.budget, self.accelerator = lengths, budget, accelerator

    def plan(self, window: list[list[list[int]]]) -> PassPlan:
        if self.budget <= 0:
            return PassPlan(window)
        passes = pack_by_tokens([unit for units in window for unit in units], self.lengths, self.budget)
        count = torch.tensor(len(passes), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return PassPlan(passes + [[] for _ in range(int(count) - len(passes))])

    def run(self, plan: PassPlan, run_passes: RunPasses) -> list[dict[str, torch.Tensor]]:
        return run_passes(plan.serial, False).metrics
