"""Preference pairs (data kind `pairs`): the prompt with the chosen answer and with the rejected one.

Both sequences are encoded like sft samples with only the final answer supervised. A micro-batch of b pairs is
one padding-free row laid out chosen_1, rejected_1, chosen_2, rejected_2, ...
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.data.conversation import Conversation
from tunesmith.data.encode import IGNORE, Dropped, encode_chat, shifted


@dataclass
class PairBatch:
    input_ids: torch.Tensor      # [1, T]
    position_ids: torch.Tensor   # [1, T]
    targets: torch.Tensor        # [1, T]: next token to predict at answer positions, else -100
    seq_bounds: list[int]        # 2b + 1 offsets: sequence k spans seq_bounds[k]:seq_bounds[k+1]
    pair_index: list[int]        # dataset index of each pair (for precomputed reference log-probs)
    source: str = "train"        # the split the pairs come from (for precomputed reference log-probs)
    attention_mask: None = None

    @property
    def n_pairs(self) -> int:
        return len(self.pair_index)

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> "PairBatch":
        return replace(self, input_ids=self.input_ids.to(device), position_ids=self.position_ids.to(device),
                       targets=self.targets.to(device))


class EncodedPairs:
    """chosen[i] and rejected[i] are the two sequences of pair i (each an EncodedSet row)."""

    def __init__(self, chosen: Any, rejected: Any, split: str = "train"):
        self.chosen, self.rejected, self.split = chosen, rejected, split

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def lengths(self) -> np.ndarray:
        return self.chosen.lengths + self.rejected.lengths

    def save(self, path: Path) -> None:
        self.chosen.save(path.with_name(path.stem + "_chosen.npz"))
        self.rejected.save(path.with_name(path.stem + "_rejected.npz"))

    @classmethod
    def load(cls, path: Path, split: str = "train") -> "EncodedPairs":
        from tunesmith.data.pipeline import EncodedSet

        return cls(EncodedSet.load(path.with_name(path.stem + "_chosen.npz")),
                   EncodedSet.load(path.with_name(path.stem + "_rejected.npz")), split)


def encode_pair(conv: Conversation, template: Any, tokenizer: Any, cutoff_len: int, truncation: str) -> tuple:
    """(chosen Encoded, rejected Encoded); the pair is dropped if either side cannot be kept."""
    out = []
    for answer in (conv.chosen, conv.rejected):
        last = template.render_chat(conv.with_answer(answer))[-1]  # type: ignore[arg-type]
        out.append(encode_chat(last, tokenizer, cutoff_len, mask_history=True,
                               truncation=truncation))
    if not any(label != IGNORE for label in out[0].labels) or not any(l != IGNORE for l in out[1].labels):
        raise Dropped("no supervised tokens")
    return out[0], out[1]


def encode_pairs(conversations: list[Conversation], template: Any, tokenizer: Any, d: Any, report: Any,
                 what: str) -> tuple[list, list, list[int]]:
    """Both sides of every pair that keeps supervised tokens, and the indices of those kept; dropped pairs are
    counted in `report`. `what` names the samples in the error when none is left."""
    from tunesmith.data.errors import DataError

    first, second, kept = [], [], []
    for i, conv in enumerate(conversations):
        try:
            a, b = encode_pair(conv, template, tokenizer, d.cutoff_len, d.truncation)
        except Dropped as drop:
            report.samples_dropped[drop.reason] += 1
            continue
        report.truncated += a.truncated or b.truncated
        first.append(a)
        second.append(b)
        kept.append(i)
    if not kept:
        raise DataError(f"no {what} left after encoding: " + ", ".join(
            f"{n} {reason}" for reason, n in report.samples_dropped.items()), fix="raise `cutoff_len` or check the data")
    return first, second, kept


def collate_pairs(data: EncodedPairs, units: list[list[int]]) -> PairBatch:
    ids, targets, positions, bounds, index = [], [], [], [0], []
    for unit in units:
        for i in unit:
            index.append(i)
            for side in (data.chosen, data.rejected):
                seq, labels = side[i]
                ids.append(seq)
                targets.append(shifted(labels))
                positions.append(np.arange(len(seq)))
                bounds.append(bounds[-1] + len(seq))
    as_row = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))[None]  # noqa: E731
    return PairBatch(as_row(ids), as_row(positions), as_row(targets), bounds, index, data.split)


def sides(batch: PairBatch) -> tuple[PairBatch, PairBatch]:
    """The first and the second sequence of every pair, each side as a batch of its own (one row)."""
    def side(k: int) -> PairBatch:
        spans = [(batch.seq_bounds[j], batch.seq_bounds[j + 1]) for j in range(k, len(batch.seq_bounds) - 1, 2)]
        take = lambda t: torch.cat([t[:, a:b] for a, b in spans], 1)  # noqa: E731
        bounds = [0]
        for a, b in spans:
            bounds.append(bounds[-1] + b - a)
        return PairBatch(take(batch.input_ids), take(batch.position_ids), take(batch.targets), bounds,
                         batch.pair_index, batch.source)
    return side(0), side(1)
