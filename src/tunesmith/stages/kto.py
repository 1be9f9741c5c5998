"""kto: Kahneman-Tversky optimisation on unpaired feedback (each answer labelled desirable or not).

With r = beta * (log pi(y|x) - log ref(y|x)) summed over the answer's tokens and z = the batch's KL estimate
max(0, mean over its samples of log pi(y'|x) - log ref(y'|x)) on mismatched answers y' (data/feedback.py), held
constant (no gradient through it):

    desirable:   kto_chosen_weight   * (1 - sigmoid(r - beta * z))
    undesirable: kto_rejected_weight * (1 - sigmoid(beta * z - r))

averaged over the samples of the step. z is estimated on each forward pass's samples (a micro-batch, or a
`max_tokens_per_forward` pass), as TRL does per micro-batch. The mismatched answers need no gradient: the policy
scores them in a forward of their own without autograd. The reference is the model with its adapter disabled
(LoRA), a frozen copy, or log-probabilities computed once (`precompute_ref`), as in dpo.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config.fields import Config
from tunesmith.stages.base import PairBatches, Stage


def check(cfg: Config) -> list[str]:
    f, problems = cfg.finetuning, []
    if cfg.data.packing:
        problems.append("`packing` does not apply to `stage: kto` (each sample is kept whole)")
    if f.pref_beta <= 0:
        problems.append(f"`pref_beta` must be positive, got {f.pref_beta}")
    for key in ("kto_chosen_weight", "kto_rejected_weight"):
        if getattr(f, key) <= 0:
            problems.append(f"`{key}` must be positive, got {getattr(f, key)}")
    return problems


def build(inputs: Any) -> tuple[Any, Any]:
    from tunesmith.train.reference import reference_logps

    f, data = inputs.cfg.finetuning, inputs.data
    inputs.use_chunked_head()
    reference = reference_logps(inputs.model, inputs.cfg, data)
    labels = {part.split: part.desirable for part in (data.train, data.eval) if part is not None}
    return inputs.model, KTOObjective(f.pref_beta, f.kto_chosen_weight, f.kto_rejected_weight, reference, labels)


class KTOObjective(PairBatches):
    unit = "samples"
    metric_names = ("loss", "rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected",
                    "count/chosen", "count/rejected")
    # means over the desirable / undesirable samples only; the counts themselves log as shares of all samples
    metric_per = {"rewards/chosen": "count/chosen", "logps/chosen": "count/chosen",
                  "rewards/rejected": "count/rejected", "logps/rejected": "count/rejected"}

    def __init__(self, beta: float, chosen_weight: float, rejected_weight: float, reference: Any,
                 labels: dict[str, Any]):
        self.beta, self.chosen_weight, self.rejected_weight = beta, chosen_weight, rejected_weight
        self.reference, self.labels = reference, labels

    def loss_sum(self, model: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
        import torch

        from tunesmith.data.pairs import sides
        from tunesmith.train.objectives import sequence_logps

        answers, mismatched = sides(batch)
        policy = sequence_logps(model, answers)[0]
        with torch.no_grad():
            policy_kl = sequence_logps(model, mismatched)[0]
            ref = self.reference(batch)
        ref_answer, ref_kl = ref[0::2], ref[1::2]
        z = (policy_kl - ref_kl).mean().clamp(min=0).detach()
        desirable = torch.as_tensor(self.labels[batch.source][batch.pair_index], device=policy.device)
        logratio = policy - ref_answer
        rewards = self.beta * logratio
        losses = torch.where(desirable, self.chosen_weight * (1 - torch.sigmoid(rewards - self.beta * z)),
                             self.rejected_weight * (1 - torch.sigmoid(self.beta * z - rewards)))
        loss = losses.sum()
        chosen, rejected = desirable.float(), (~desirable).float()
        r, logp = rewards.detach(), policy.detach()
        return loss, {"loss": loss.detach(), "rewards/chosen": (r * chosen).sum(),
                      "rewards/rejected": (r * rejected).sum(), "kl": z * len(desirable),
                      "logps/chosen": (logp * chosen).sum(), "logps/rejected": (logp * rejected).sum(),
                      "count/chosen": chosen.sum(), "count/rejected": rejected.sum()}


def keeps_reference(cfg: Config) -> bool:
    return cfg.finetuning.finetuning_type != "lora" and not cfg.finetuning.precompute_ref


STAGE = Stage("kto", rows="feedback", build=build, check=check, needs_packed_rows=True,
              keeps_reference=keeps_reference, shards=lambda cfg: cfg.finetuning.finetuning_type == "lora")
