"""Objectives shared by stages (stages/). The loop asks an objective for: a batch from sample indices
(`collate`), how many units the batch counts for (`count`: supervised tokens, pairs, ...), and the summed loss
plus metric sums (`loss_sum`), so that dividing by the global unit count of the whole accumulated batch gives
the mean. `unit` names what is counted and `metric_names` what `loss_sum` returns.
"""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.data.batching import IGNORE, collate
from tunesmith.data.pairs import PairBatch
from tunesmith.model.attention import BOUNDS_KWARG
from tunesmith.train.head_loss import installed_head, token_nll
from tunesmith.train.loss import token_loss_sum


class LMObjective:
    """Next-token cross-entropy, averaged over supervised tokens (stages pt and sft)."""

    unit = "supervised_tokens"

    def __init__(self, padding_free: bool, pad_id: int, accuracy: bool = False, shape_bucket: int = 1,
                 kept_rows: bool = False):
        self.padding_free, self.pad_id, self.accuracy = padding_free, pad_id, accuracy
        self.bucket, self.kept_rows = shape_bucket, kept_rows
        self.metric_names = ("loss", "accuracy") if accuracy else ("loss",)

    def collate(self, data: Any, units: list[list[int]]) -> Any:
        return collate(data, units, self.padding_free, self.pad_id, self.bucket)

    def count(self, batch: Any) -> int:
        return batch.n_targets

    def loss_sum(self, model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        correct: list[torch.Tensor] | None = [] if self.accuracy else None
        loss, _ = token_loss_sum(model, batch, correct, self.bucket, self.kept_rows)
        metrics = {"loss": loss.detach()}
        if correct:
            metrics["accuracy"] = correct[0]
        return loss, metrics


def token_logps(model: Any, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every supervised token of the batch's sequences, and the sequence each belongs to."""
    supervised = batch.targets[0] != IGNORE
    keep = supervised.nonzero().squeeze(-1)
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, logits_to_keep=keep,
                **{BOUNDS_KWARG: batch.seq_bounds})
    head = installed_head(model)
    if head is not None:  # hidden states handed through: head + log-softmax in chunks
        logp = -token_nll(out.logits[0], head, batch.targets[0, keep], summed=False)[0]
    else:
        logits = out.logits[0].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets[0, keep][:, None]).squeeze(-1)
    ends = torch.tensor(batch.seq_bounds[1:], device=keep.device)
    return logp, torch.searchsorted(ends, keep, right=True)


def sequence_logps(model: Any, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's answer tokens, and their count: two [2 x pairs] tensors."""
    logp, seq_of = token_logps(model, batch)
    n_seq = len(batch.seq_bounds) - 1
    sums = torch.zeros(n_seq, device=logp.device).index_add(0, seq_of, logp)
    counts = torch.zeros(n_seq, device=logp.device).index_add(0, seq_of, torch.ones_like(logp))
    return sums, counts


def averaged(sums: dict[str, float], units: float, objective: Any) -> dict[str, float]:
    """Metric sums as means: over the step's units, or over another summed metric where the objective names one
    in `metric_per` (kto's rewards/chosen is a mean over the desirable samples)."""
    per, hidden = getattr(objective, "metric_per", {}), getattr(objective, "hidden_metrics", ())
    out = {}
    for name, value in sums.items():
        if name in hidden:
            continue
        denominator = sums.get(per[name], 0.0) if name in per else units
        out[name] = value / denominator if denominator > 0 else 0.0
    return out
