"""rm: a reward model. The language model gains a value head that scores each sequence at its last token; the
loss is -log sigmoid(score_chosen - score_rejected), averaged over pairs."""

from __future__ import annotations

from typing import Any

from tunesmith.config.fields import Config
from tunesmith.stages.base import PairBatches, Stage


def check(cfg: Config) -> list[str]:
    if cfg.data.packing:
        return ["`packing` does not apply to `stage: rm` (pairs are kept whole)"]
    return []


def build(inputs: Any) -> tuple[Any, Any]:
    from tunesmith.model.value_head import RewardModel

    model = RewardModel(inputs.model, inputs.model.config.hidden_size, inputs.cfg.training.seed)
    return model.to(inputs.accelerator.device), RewardObjective()


class RewardObjective(PairBatches):
    metric_names = ("loss", "accuracy")

    def loss_sum(self, model: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
        import torch.nn.functional as F

        scores = model(batch).float()
        chosen, rejected = scores[0::2], scores[1::2]
        loss = -F.logsigmoid(chosen - rejected).sum()
        return loss, {"loss": loss.detach(), "accuracy": (chosen > rejected).float().sum()}


STAGE = Stage("rm", rows="pairs", build=build, check=check, predict="score", needs_packed_rows=True)
