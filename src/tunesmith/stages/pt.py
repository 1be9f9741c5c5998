"""pt: next-token prediction on every token of plain text (documents longer than cutoff_len are cut in chunks)."""

from __future__ import annotations

from typing import Any

from tunesmith.config.fields import Config
from tunesmith.stages.base import Stage


def check(cfg: Config) -> list[str]:
    if cfg.data.train_on_prompt or cfg.data.mask_history:
        return ["`train_on_prompt` and `mask_history` apply to sft, not pt (pt trains on every token)"]
    return []


def build(inputs: Any) -> tuple[Any, Any]:
    from tunesmith.train.objectives import LMObjective

    inputs.use_chunked_head()
    return inputs.model, LMObjective(inputs.padding_free, inputs.pad_id, inputs.cfg.finetuning.compute_accuracy,
                                     inputs.profile.shape_bucket, inputs.use_kept_rows())


STAGE = Stage("pt", rows="text", build=build, check=check, shards=lambda cfg: True)
