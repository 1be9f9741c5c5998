"""What a stage declares. Stage modules import torch only inside functions: their config checks run before
torch loads (config/preflight.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from tunesmith.config.fields import Config

# What a dataset row becomes (data/formats.py): pre-training text, a conversation, a conversation with a
# chosen and a rejected answer, a conversation whose last answer is labelled desirable or not, or a prompt the
# policy answers during training.
Rows = Literal["text", "chat", "pairs", "feedback", "prompts"]


def no_problems(cfg: Config) -> list[str]:
    return []


@dataclass(frozen=True)
class Stage:
    name: str
    rows: Rows
    # StageInputs (train/setup.py) -> (the model to train, the objective the loop calls)
    build: Callable[[Any], tuple[Any, Any]]
    # problems of a config with this stage, every one (no torch, no model)
    check: Callable[[Config], list[str]] = no_problems
    # what `tunesmith predict` does with a model of this stage: generate answers, score pairs, or nothing
    predict: Literal["generate", "score"] | None = None
    # a batch is one row of several sequences, so attention must honour packed position ids
    needs_packed_rows: bool = False
    # full/freeze tuning keeps a frozen copy of the model as its reference (the memory estimate counts it)
    keeps_reference: Callable[[Config], bool] = lambda cfg: False
    # runs under `fsdp` (train/fsdp.py): every rank makes the same forwards, and no second model is kept
    shards: Callable[[Config], bool] = lambda cfg: False

    @property
    def uses_template(self) -> bool:
        return self.rows != "text"


class PairBatches:
    """For objectives on preference pairs: a batch is chosen/rejected rows (data/pairs.py), the loss is averaged
    over pairs."""

    unit = "pairs"

    def collate(self, data: Any, units: list[list[int]]) -> Any:
        from tunesmith.data.pairs import collate_pairs

        return collate_pairs(data, units)

    def count(self, batch: Any) -> int:
        return batch.n_pairs
