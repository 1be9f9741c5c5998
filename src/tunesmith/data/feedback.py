"""Unpaired feedback (data kind `feedback`, stage kto): a conversation whose last answer is desirable or not.

Each sample is two sequences encoded like a preference pair (only the final answer supervised): the prompt with
its own answer, and the prompt with the answer of the next sample in the split (the last one takes the first's).
The second, mismatched sequence is what KTO's KL estimate is computed on (the KTO paper pairs prompts with
unrelated completions of the same batch); rotating by one keeps it deterministic and independent of the batch
size. A micro-batch is laid out like pairs: answer_1, mismatched_1, answer_2, mismatched_2, ...
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data.conversation import Conversation
from tunesmith.data.errors import DataError
from tunesmith.data.pairs import EncodedPairs, encode_pairs


class EncodedFeedback(EncodedPairs):
    """`chosen[i]` is sample i's own answer, `rejected[i]` its mismatched one; `desirable[i]` its label."""

    def __init__(self, own: Any, mismatched: Any, desirable: np.ndarray, split: str = "train"):
        super().__init__(own, mismatched, split)
        self.desirable = desirable

    def save(self, path: Path) -> None:
        super().save(path)
        np.save(path.with_name(path.stem + "_desirable.npy"), self.desirable)

    @classmethod
    def load(cls, path: Path, split: str = "train") -> "EncodedFeedback":
        pairs = EncodedPairs.load(path, split)
        return cls(pairs.chosen, pairs.rejected, np.load(path.with_name(path.stem + "_desirable.npy")), split)


def as_pair(conv: Conversation, mismatched: Conversation) -> Conversation:
    """conv's prompt with its own last answer as `chosen` and `mismatched`'s last answer as `rejected`."""
    prompt = Conversation(messages=conv.messages[:-1], system=conv.system, tools=conv.tools, source=conv.source)
    prompt.chosen, prompt.rejected = conv.messages[-1], mismatched.messages[-1]
    return prompt


def encode_all_feedback(conversations: list[Conversation], cfg: Any, tokenizer: Any, template: Any,
                        report: Any, split: str) -> EncodedFeedback:
    from tunesmith.data.pipeline import EncodedSet

    labels = Counter(c.desirable for c in conversations)
    if split == "train" and (not labels[True] or not labels[False]):
        kind = "desirable" if labels[True] else "undesirable"
        first = conversations[0].source if conversations else None
        raise DataError(f"every training sample is labelled {kind}: KTO needs both desirable and undesirable "
                        "answers", file=first[0] if first else None, field="kto_tag",
                        fix="add samples with the other label, or train with `stage: sft` on the desirable ones")
    n = len(conversations)
    pairs = [as_pair(conv, conversations[(i + 1) % n]) for i, conv in enumerate(conversations)]
    own, mismatched, kept = encode_pairs(pairs, template, tokenizer, cfg.data, report, "feedback samples")
    desirable = [bool(conversations[i].desirable) for i in kept]
    return EncodedFeedback(EncodedSet.from_samples(own), EncodedSet.from_samples(mismatched),
                           np.array(desirable, dtype=bool), split)
