"""Passes of one optimizer step run side by side on CPU threads (`parallel_passes`).

On a CPU, PyTorch splits each kernel over all cores. The kernels of a small model (attention's batched products
over a few heads, casts, elementwise ops) are too small to split well, so running two passes at once, each on
its share of the cores, keeps every core busier (gains by model and CPU in benchmarks/LOG.md). The step's
samples are dealt to the workers by estimated cost, and each worker sums its own gradients; the workers' sums
are added in worker order, so a run is reproducible. With `max_tokens_per_forward`, no more than that many tokens
are in flight at once (samples longer than a worker's share run alone, on all the cores), so the activation peak
is that of one pass of the budget.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch

from tunesmith.data.batching import pack_by_tokens
from tunesmith.train.passes import PassPlan, PassResult, RunPasses

# A sample's cost in token-equivalents: its tokens plus the attention term, which grows with the square of its
# length (the weight is a rough fit to small Llamas on a CPU; it only balances the workers, it changes no result).
ATTENTION_TOKENS = 2048


def deal_to_workers(window: list[list[list[int]]], lengths: np.ndarray, workers: int,
                    budget: int) -> tuple[list[list[list[int]]], list[list[list[list[int]]]]]:
    """A step's units as (solo passes, one list of passes per worker). With a token budget, no more than `budget`
    tokens are in flight at once: each worker's passes hold at most budget // workers tokens, and a unit longer
    than that runs alone on all the cores, packed with the others like it into passes of `budget`. The rest are
    dealt to `workers` groups of about equal cost (longest first, each to the least loaded group). `budget` <= 0
    bounds each worker's pass by the largest micro-batch's token count instead, and runs nothing alone."""
    units = [unit for micro_batch in window for unit in micro_batch]
    size = {id(unit): int(sum(lengths[i] for i in unit)) for unit in units}
    if budget > 0:
        share = max(1, budget // workers)
        long = [u for u in units if size[id(u)] > share]
        solo = pack_by_tokens(long, lengths, budget) if long else []
        units = [u for u in units if size[id(u)] <= share]
    else:
        share = max(sum(size[id(u)] for u in micro_batch) for micro_batch in window)
        solo = []
    loads, groups = [0.0] * workers, [[] for _ in range(workers)]
    for unit in sorted(units, key=lambda u: -size[id(u)]):
        k = loads.index(min(loads))
        n = size[id(unit)]
        loads[k] += n + n * n / ATTENTION_TOKENS
        groups[k].append(unit)
    return solo, [pack_by_tokens(group, lengths, share) if group else [] for group in groups]


class ParallelPasses:
    """The pass runner of `parallel_passes: N` (see train/passes.py): serial passes first, on all the cores, then
    one group per worker (the calling thread is worker 0), whose gradients are returned and added in order."""

    def __init__(self, workers: int, lengths: np.ndarray, budget: int, params: list[torch.Tensor]):
        self.workers, self.lengths, self.budget, self.params = workers, lengths, budget, params
        self.executor = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="tunesmith-pass")

    def plan(self, window: list[list[list[int]]]) -> PassPlan:
        return PassPlan(*deal_to_workers(window, self.lengths, self.workers, self.budget))

    def run(self, plan: PassPlan, run_passes: RunPasses) -> list[dict[str, torch.Tensor]]:
        metrics = run_passes(plan.serial, False).metrics
        if any(plan.groups):
            results = self.in_threads(plan.groups, lambda group: run_passes(group, True))
            add_in_order(self.params, [r.grads for r in results])
            metrics += [m for r in results for m in r.metrics]
        return metrics

    def in_threads(self, groups: list[Any], run_group: Callable[[Any], PassResult]) -> list[PassResult]:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // self.workers))  # each worker gets its share of the cores
        try:
            futures = [self.executor.submit(run_group, group) for group in groups[1:]]
            first = run_group(groups[0])
            return [first] + [f.result() for f in futures]
        finally:
            torch.set_num_threads(threads)


def add_in_order(params: list[torch.Tensor], per_worker: list[list[torch.Tensor | None] | None]) -> None:
    """Sets each parameter's .grad to the sum of the workers' gradients, added in worker order."""
    for k, param in enumerate(params):
        total = None
        for grads in per_worker:
            g = None if grads is None else grads[k]
            if g is not None:
                total = g if total is None else total.add_(g)
        if total is not None:
            param.grad = total if param.grad is None else param.grad.add_(total)
