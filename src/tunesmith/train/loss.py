"""The causal-LM loss, computed only where there is something to predict."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.data.batching import IGNORE, Batch
from tunesmith.model.attention import BOUNDS_KWARG
from tunesmith.model.kept_rows import KEEP_ROWS_KWARG
from tunesmith.train.head_loss import installed_head, token_nll


def token_loss_sum(model: Any, batch: Batch, correct: list | None = None, bucket: int = 1,
                   kept_rows: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over supervised positions, and their count.

    The output head runs only on supervised positions (`logits_to_keep` with their indices), so prompt tokens
    cost no head work; the loss itself is computed in fp32, in chunks of positions where the chunked head is
    installed (train/head_loss.py), so a large vocabulary's logits never exist whole. `bucket` > 1
    rounds the number of kept positions up (repeats of the last one, without targets) to limit distinct shapes.
    `kept_rows`: the model's last layer was installed by `model.kept_rows` and also works only at those positions.
    """
    supervised = batch.targets != IGNORE
    keep = supervised.any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:  # nothing to learn here; still run the model so every parameter joins the graph
        keep = torch.zeros(1, dtype=torch.long, device=batch.input_ids.device)
    targets = batch.targets[:, keep]                 # [rows, len(keep)]
    extra_rows = -keep.numel() % bucket
    if extra_rows:
        keep = torch.cat([keep, keep[-1:].expand(extra_rows)])
        targets = torch.cat([targets, targets.new_full((targets.shape[0], extra_rows), IGNORE)], dim=1)
    extra = {BOUNDS_KWARG: batch.seq_bounds} if batch.seq_bounds is not None else {}
    if kept_rows:  # the last layer already returns only the kept rows: the head takes them all
        extra[KEEP_ROWS_KWARG] = keep
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                use_cache=False, logits_to_keep=0 if kept_rows else keep, **extra)
    head = installed_head(model)
    if head is not None:  # the model handed its hidden states through: head + loss in chunks
        nll, hits = token_nll(out.logits, head, targets)
        if correct is not None:
            correct.append(hits.sum().float())
        return nll.sum(), int(supervised.sum())
    logits = out.logits.float()                      # [rows, len(keep), vocab]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    if correct is not None:  # token accuracy: the most likely next token is the label
        correct.append(((logits.argmax(-1) == targets) & (targets != IGNORE)).sum().float())
    return loss, int(supervised.sum())
