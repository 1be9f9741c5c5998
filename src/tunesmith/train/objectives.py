"""What each stage optimises. The loop asks an objective for: a batch from sample indices, how many units the
batch counts for (supervised tokens for pt/sft, pairs for rm/dpo), and the summed loss (plus metric sums) so
that dividing by the global unit count of the whole accumulated batch gives the mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.data.batching import IGNORE, collate
from tunesmith.data.pairs import PairBatch, collate_pairs
from tunesmith.model.attention import BOUNDS_KWARG
from tunesmith.train.head_loss import installed_head, token_nll
from tunesmith.train.loss import token_loss_sum


class LMObjective:
    """pt and sft: next-token cross-entropy, averaged over supervised tokens."""

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


def sequence_logps(model: Any, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's answer tokens, and their count: two [2 x pairs] tensors."""
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
    seq_of = torch.searchsorted(ends, keep, right=True)
    n_seq = len(batch.seq_bounds) - 1
    sums = torch.zeros(n_seq, device=logp.device).index_add(0, seq_of, logp)
    counts = torch.zeros(n_seq, device=logp.device).index_add(0, seq_of, torch.ones_like(logp))
    return sums, counts


class PairObjective:
    """rm and dpo batches: chosen/rejected rows, averaged over pairs."""

    unit = "pairs"

    def collate(self, data: Any, units: list[list[int]]) -> PairBatch:
        return collate_pairs(data, units)

    def count(self, batch: PairBatch) -> int:
        return batch.n_pairs


class RewardObjective(PairObjective):
    """rm: -log sigmoid(r_chosen - r_rejected), scores read by the value head at each sequence's last token."""

    metric_names = ("loss", "accuracy")

    def loss_sum(self, model: Any, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = model(batch).float()
        chosen, rejected = scores[0::2], scores[1::2]
        loss = -F.logsigmoid(chosen - rejected).sum()
        return loss, {"loss": loss.detach(), "accuracy": (chosen > rejected).float().sum()}


class DPOObjective(PairObjective):
    """dpo and its variants on the policy's and the reference's answer log-probabilities.

    sigmoid (DPO): -log sigmoid(beta * margin); ipo: (margin - 1/(2 beta))^2 on per-token averages;
    hinge: relu(1 - beta * margin); simpo (no reference): -log sigmoid(beta * (avg_c - avg_r) - gamma);
    orpo (no reference): chosen NLL - beta * log sigmoid(log odds ratio), on per-token averages.
    margin = (policy_c - policy_r) - (ref_c - ref_r). pref_ftx adds that weight x the chosen answer's mean NLL.
    """

    metric_names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                     "logps/chosen", "logps/rejected")

    def __init__(self, beta: float, loss_type: str, ftx: float, simpo_gamma: float, reference: Any):
        self.beta, self.loss_type, self.ftx, self.gamma = beta, loss_type, ftx, simpo_gamma
        self.reference = reference  # callable(batch) -> [2 x pairs] summed log-probs, or None for simpo

    def loss_sum(self, model: Any, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sums, counts = sequence_logps(model, batch)
        pc, pr, nc, nr = sums[0::2], sums[1::2], counts[0::2], counts[1::2]
        if self.loss_type == "simpo":
            logits = self.beta * (pc / nc - pr / nr) - self.gamma
            losses, rc, rr = -F.logsigmoid(logits), self.beta * pc / nc, self.beta * pr / nr
        elif self.loss_type == "orpo":
            avg_c, avg_r = pc / nc, pr / nr
            # log odds of an answer: log p - log(1 - p), on per-token average log-probabilities
            log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
            losses, rc, rr = -avg_c - self.beta * F.logsigmoid(log_odds), self.beta * avg_c, self.beta * avg_r
        else:
            with torch.no_grad():
                ref = self.reference(batch)
            refc, refr = ref[0::2], ref[1::2]
            if self.loss_type == "ipo":
                margin = (pc / nc - pr / nr) - (refc / nc - refr / nr)
                losses = (margin - 1 / (2 * self.beta)) ** 2
            else:
                margin = (pc - pr) - (refc - refr)
                losses = -F.logsigmoid(self.beta * margin) if self.loss_type == "sigmoid" else \
                    F.relu(1 - self.beta * margin)
            rc, rr = self.beta * (pc - refc).detach(), self.beta * (pr - refr).detach()
        if self.ftx > 0:
            losses = losses + self.ftx * (-pc / nc)
        loss = losses.sum()
        rc, rr = rc.detach(), rr.detach()
        return loss, {"loss": loss.detach(), "rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(),
                      "rewards/accuracies": (rc > rr).float().sum(), "rewards/margins": (rc - rr).sum(),
                      "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}
