"""Prompts (data kind `prompts`, stage grpo): what the policy answers during training, with what rewards need.

Each sample is the rendered prompt (the template's generation prompt included) as token ids, plus its text, the
reference answer (the row's final assistant turn or alpaca `output`, when it has one) and the row's columns as
read, for user reward functions. The answers themselves are generated during training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data.conversation import Conversation
from tunesmith.data.errors import DataError


class EncodedPrompts:
    """Prompt i: `ids[offsets[i]:offsets[i+1]]`, and `meta[i]` = {prompt, reference, columns}."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, meta: list[dict[str, Any]], split: str = "train",
                 completion_budget: int = 0):
        self.ids, self.offsets, self.meta, self.split = ids, offsets, meta, split
        self.completion_budget = completion_budget  # tokens each prompt's answers may add (for pass planning)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt ids, labels): nothing of a prompt is trained on (the answers are generated)."""
        ids = self.ids[self.offsets[i]: self.offsets[i + 1]]
        return ids, np.full_like(ids, -100)

    def prompt_ids(self, i: int) -> list[int]:
        return self.ids[self.offsets[i]: self.offsets[i + 1]].tolist()

    @property
    def lengths(self) -> np.ndarray:
        """Upper bounds of the tokens a prompt's rollouts take: the prompt and its answers, each at the longest."""
        return np.diff(self.offsets) + self.completion_budget

    def supervised_tokens(self) -> int:
        return 0

    def save(self, path: Path) -> None:
        np.savez(path, ids=self.ids, offsets=self.offsets)
        path.with_suffix(".json").write_text(json.dumps(self.meta, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path, split: str = "train") -> "EncodedPrompts":
        with np.load(path) as data:
            ids, offsets = data["ids"], data["offsets"]
        return cls(ids, offsets, json.loads(path.with_suffix(".json").read_text(encoding="utf-8")), split)


def encode_all_prompts(conversations: list[Conversation], cfg: Any, tokenizer: Any, template: Any,
                       report: Any, split: str) -> EncodedPrompts:
    ids, offsets, meta = [], [0], []
    for conv in conversations:
        text = template.render_prompt(conv)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) > cfg.data.cutoff_len:
            report.samples_dropped["prompt longer than cutoff_len"] += 1
            continue
        ids.extend(encoded)
        offsets.append(len(ids))
        meta.append({"prompt": text, "reference": conv.reference, "columns": _json_safe(conv.columns or {})})
    if not meta:
        raise DataError("no prompts left after encoding: " + ", ".join(
            f"{n} {reason}" for reason, n in report.samples_dropped.items()), fix="raise `cutoff_len` or check the data")
    return EncodedPrompts(np.array(ids, dtype=np.int32), np.array(offsets, dtype=np.int64), meta, split)


def _json_safe(columns: dict[str, Any]) -> dict[str, Any]:
    """The row's columns as JSON keeps them (the cache stores them as JSON)."""
    return json.loads(json.dumps(columns, ensure_ascii=False, default=str))
