"""dpo: direct preference optimisation and its variants, on the answer log-probabilities of the policy and of
a frozen reference.

sigmoid (DPO): -log sigmoid(beta * margin); ipo: (margin - 1/(2 beta))^2 on per-token averages;
hinge: relu(1 - beta * margin); simpo (no reference): -log sigmoid(beta * (avg_c - avg_r) - gamma);
orpo (no reference): chosen NLL - beta * log sigmoid(log odds ratio), on per-token averages.
margin = (policy_c - policy_r) - (ref_c - ref_r). pref_ftx adds that weight x the chosen answer's mean NLL.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config.fields import Config
from tunesmith.stages.base import PairBatches, Stage

NO_REFERENCE = ("simpo", "orpo")


def check(cfg: Config) -> list[str]:
    problems = []
    if cfg.data.packing:
        problems.append("`packing` does not apply to `stage: dpo` (pairs are kept whole)")
    if cfg.finetuning.pref_beta <= 0:
        problems.append(f"`pref_beta` must be positive, got {cfg.finetuning.pref_beta}")
    return problems


def build(inputs: Any) -> tuple[Any, Any]:
    from tunesmith.train.reference import reference_logps

    f = inputs.cfg.finetuning
    inputs.use_chunked_head()
    reference = None if f.pref_loss in NO_REFERENCE else reference_logps(inputs.model, inputs.cfg, inputs.data)
    return inputs.model, DPOObjective(f.pref_beta, f.pref_loss, f.pref_ftx, f.simpo_gamma, reference)


class DPOObjective(PairBatches):
    metric_names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected")

    def __init__(self, beta: float, loss_type: str, ftx: float, simpo_gamma: float, reference: Any):
        self.beta, self.loss_type, self.ftx, self.gamma = beta, loss_type, ftx, simpo_gamma
        self.reference = reference  # callable(batch) -> [2 x pairs] summed log-probs, or None for simpo/orpo

    def loss_sum(self, model: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
        import torch
        import torch.nn.functional as F

        from tunesmith.train.objectives import sequence_logps

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
            rc, rr = self.beta * (pc - refc), self.beta * (pr - refr)
        if self.ftx > 0:
            losses = losses + self.ftx * (-pc / nc)
        loss = losses.sum()
        rc, rr = rc.detach(), rr.detach()
        return loss, {"loss": loss.detach(), "rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(),
                      "rewards/accuracies": (rc > rr).float().sum(), "rewards/margins": (rc - rr).sum(),
                      "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}


def keeps_reference(cfg: Config) -> bool:
    f = cfg.finetuning
    return f.pref_loss not in NO_REFERENCE and f.finetuning_type != "lora" and not f.precompute_ref


def shards(cfg: Config) -> bool:
    """Under fsdp: LoRA (the reference is the model with its adapter disabled) or a loss without reference."""
    return cfg.finetuning.finetuning_type == "lora" or cfg.finetuning.pref_loss in NO_REFERENCE


STAGE = Stage("dpo", rows="pairs", build=build, check=check, needs_packed_rows=True, keeps_reference=keeps_reference,
              shards=shards)
