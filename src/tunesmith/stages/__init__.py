"""The training stages: one module each, registered in this table.

A stage module defines `STAGE` (see `base.Stage`): the data kind its datasets become, its config checks, how it
builds its objective, and how `tunesmith predict` uses a model it trained. Nothing else in tunesmith tests a
stage's name: adding a stage is one module here plus a line in `STAGES`.

This module imports nothing, so the config can read the stage names before anything heavy loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunesmith.stages.base import Stage

# name -> (module, one line for --help)
STAGES = {
    "pt": ("tunesmith.stages.pt", "pre-training on plain text"),
    "sft": ("tunesmith.stages.sft", "supervised fine-tuning on conversations"),
    "rm": ("tunesmith.stages.rm", "a reward model on preference pairs"),
    "dpo": ("tunesmith.stages.dpo", "direct preference optimisation (and ipo, hinge, simpo, orpo)"),
    "kto": ("tunesmith.stages.kto", "Kahneman-Tversky optimisation on answers labelled desirable or not"),
    "grpo": ("tunesmith.stages.grpo", "group relative policy optimisation with reward functions"),
}
NAMES = tuple(STAGES)


def get(name: str) -> "Stage":
    """The stage registered as `name` (a validated config value)."""
    return importlib.import_module(STAGES[name][0]).STAGE


def predicting(how: str | None = None) -> list[str]:
    """Names of the stages whose models `tunesmith predict` uses `how` ("generate", "score"; None: in any way)."""
    return [name for name in NAMES if (get(name).predict == how if how else get(name).predict is not None)]


def summary() -> str:
    return "; ".join(f"{name}: {line}" for name, (_, line) in STAGES.items())
