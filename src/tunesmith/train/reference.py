"""The reference model of preference stages: the log-probabilities the policy is compared with.

LoRA: the same model with the adapter disabled (no second copy). Full or freeze tuning: a frozen copy, or, with
`precompute_ref`, a table computed once before training and the copy freed.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from tunesmith.config import Config
from tunesmith.data.pairs import PairBatch, collate_pairs
from tunesmith.data.pipeline import Datasets
from tunesmith.train.objectives import sequence_logps


def reference_logps(model: Any, cfg: Config, data: Datasets) -> Callable[[PairBatch], torch.Tensor]:
    """A callable: batch -> [2 x pairs] summed answer log-probabilities under the reference."""
    if cfg.finetuning.finetuning_type == "lora":
        def with_adapter_disabled(batch: PairBatch) -> torch.Tensor:
            peft_model = getattr(model, "module", model)
            with peft_model.disable_adapter():
                return sequence_logps(model, batch)[0]
        return with_adapter_disabled
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if not cfg.finetuning.precompute_ref:
        return lambda batch: sequence_logps(frozen, batch)[0]
    tables = {}
    device = next(frozen.parameters()).device
    with torch.no_grad():
        for split in (data.train, data.eval):
            if split is not None:
                rows = [sequence_logps(frozen, collate_pairs(split, [[i]]).to(device))[0] for i in range(len(split))]
                tables[split.split] = torch.stack(rows)  # [pairs, 2]
    del frozen
    return PrecomputedReference(tables)


class PrecomputedReference:
    """Reference log-probabilities looked up by the batch's split ("train", "eval") and pair indices."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    def __call__(self, batch: PairBatch) -> torch.Tensor:
        return self.tables[batch.source][batch.pair_index].reshape(-1).to(batch.input_ids.device)
