"""Encoded samples -> micro-batches, padding-free.

A micro-batch of b samples is one row: the samples laid end to end, position ids restarting at 0 for each, so
attention stays inside each sample (transformers derives a block-diagonal mask from the position ids, or uses
varlen FlashAttention). Nothing is padded, so no compute is spent on padding. Targets are shifted inside each
sample: the last token of a sample never predicts the first token of the next.

The order is a pure function of (seed, epoch, rank), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from typing import TYPE_CHECKING

from tunesmith.data.encode import IGNORE, shifted

if TYPE_CHECKING:  # the type only: pipeline imports this module's users
    from tunesmith.data.pipeline import EncodedSet


@dataclass
class Batch:
    input_ids: torch.Tensor     # [rows, T]
    position_ids: torch.Tensor  # [rows, T]
    targets: torch.Tensor       # [rows, T]: the token each position must predict, or -100
    attention_mask: torch.Tensor | None  # only for padded batches
    n_samples: int
    seq_bounds: list[int] | None = None  # padding-free: where each sample starts and ends in the row
    bucket_padding: int = 0  # padding-free: tokens added at the end to round the row's length

    @property
    def n_tokens(self) -> int:
        """Real tokens (no padding)."""
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return self.input_ids.numel() - self.bucket_padding

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.position_ids), move(self.targets), move(self.attention_mask),
                     self.n_samples, self.seq_bounds, self.bucket_padding)


def collate(data: EncodedSet, units: list[list[int]], padding_free: bool, pad_id: int, bucket: int = 1) -> Batch:
    """Each unit (one sample, or several packed ones) becomes a row; rows are concatenated when padding-free,
    right-padded otherwise. `bucket` > 1 rounds a padding-free row up to a multiple of it with a padding
    segment of its own (no targets, attended by nothing else), so the kernels see few distinct shapes."""
    rows = []
    for unit in units:
        ids = np.concatenate([data[i][0] for i in unit])
        targets = np.concatenate([shifted(data[i][1]) for i in unit])
        positions = np.concatenate([np.arange(len(data[i][0])) for i in unit])
        rows.append((ids, targets, positions))
    n_samples = sum(len(u) for u in units)
    if padding_free:
        pad = -sum(len(r[0]) for r in rows) % bucket
        if pad:
            rows.append((np.full(pad, pad_id), np.full(pad, IGNORE), np.arange(pad)))
        ids, targets, positions = (np.concatenate([r[k] for r in rows])[None] for k in range(3))
        sizes = [len(data[i][0]) for unit in units for i in unit] + ([pad] if pad else [])
        bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        return Batch(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(positions.astype(np.int64)),
                     torch.from_numpy(targets.astype(np.int64)), None, n_samples, bounds, pad)
    width = max(len(r[0]) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for k, (i, t, p) in enumerate(rows):
        ids[k, : len(i)], targets[k, : len(i)], positions[k, : len(i)], mask[k, : len(i)] = i, t, p, 1
    return Batch(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(targets),
                 torch.from_numpy(mask), n_samples)


def first_fit(items: list, sizes: list[int], capacity: int) -> list[list]:
    """Each item, in the given order, into the first bin with room for it (a new bin if none; an item larger
    than `capacity` gets a bin of its own)."""
    bins: list[list] = []
    room: list[int] = []
    for item, n in zip(items, sizes):
        k = next((k for k, r in enumerate(room) if n <= r), None)
        if k is None:
            bins.append([])
            room.append(capacity)
            k = len(bins) - 1
        bins[k].append(item)
        room[k] -= n
    return bins


def pack_by_tokens(units: list[list[int]], lengths: np.ndarray, budget: int) -> list[list[list[int]]]:
    """Whole units in as few groups of at most `budget` tokens as first-fit decreasing finds (a longer unit goes
    alone): the passes of one optimizer step. The loss is normalised by the step's token count, so passes over
    the groups give the step's gradients, however its micro-batches are regrouped; fuller passes mean fewer,
    larger kernels."""
    sized = sorted(((int(sum(lengths[i] for i in unit)), unit) for unit in units),
                   key=lambda pair: -pair[0])  # stable: equal sizes keep their order
    return first_fit([unit for _, unit in sized], [n for n, _ in sized], budget) or [[]]


def pack_units(lengths: np.ndarray, order: list[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit of samples (in the given order) into bins of at most `capacity` tokens."""
    return first_fit(list(order), [int(lengths[i]) for i in order], capacity)


class BatchPlan:
    """Which units go into which micro-batch, per epoch and rank."""

    def __init__(self, data: EncodedSet, batch_size: int, seed: int, shuffle: bool, packing_len: int | None = None,
                 rank: int = 0, world: int = 1):
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.packing_len, self.rank, self.world = packing_len, rank, world

    def units(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.data)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data)).tolist()
        if self.packing_len:
            return pack_units(self.data.lengths, order, self.packing_len)
        return [[i] for i in order]

    def micro_batches(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches for the epoch. Every rank gets the same number; a rank short of a full
        last batch gets a smaller one (never a duplicated sample, so each sample counts once)."""
        units = self.units(epoch)
        per_step = self.batch_size * self.world
        batches = []
        for start in range(0, len(units), per_step):
            chunk = units[start : start + per_step]
            mine = chunk[self.rank :: self.world]
            batches.append(mine)
        return batches

    def __len__(self) -> int:
        units = len(self.units(0)) if self.packing_len else len(self.data)
        return -(-units // (self.batch_size * self.world))
