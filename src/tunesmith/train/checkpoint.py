"""Checkpoints hold everything a resume needs, and appear atomically.

checkpoint-N/ holds the trainable weights (a peft adapter, or the whole model for freeze/full), the tokenizer,
optimizer.pt (or deepspeed/ with every rank's optimizer shard), scheduler.pt, rng_state_<rank>.pth and
trainer_state.json (step, data position, best metric).
It is written as checkpoint-N.tmp-* and renamed when complete, so a killed save is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0                # epoch in progress
    batches_done_in_epoch: int = 0  # micro-batches of that epoch already consumed
    best_metric: float | None = None
    best_checkpoint: str | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        return cls(**json.loads(path.read_text()))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (a state file present), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(model: Any, out: Path) -> None:
    """A peft adapter (PeftModel.from_pretrained loads it) or a full model folder."""
    model.save_pretrained(out, safe_serialization=True)


def load_trainable_weights(model: Any, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    if hasattr(model, "load_head"):  # a reward model: the value head, then its language model
        model.load_head(checkpoint)
        model = model.lm

    if (checkpoint / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(checkpoint.glob("model*.safetensors")):
        state.update(load_file(shard))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = trainable - set(state)
    if missing:
        raise RuntimeError(f"{checkpoint} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in trainable:
            params[name].copy_(state[name])


def save_checkpoint(output_dir: Path, step: int, model: Any, tokenizer: Any, stepper: Any, scheduler: Any,
                    state: TrainerState, rank: int, is_main: bool, barrier: Any) -> Path:
    """Called on every rank: the optimizer may be sharded (DeepSpeed), and each rank has its own RNG."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp-save"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    stepper.save_weights(model, tmp, is_main)
    if is_main:
        tokenizer.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    stepper.save_optimizer(tmp, is_main)
    torch.save(rng_state(), tmp / f"rng_state_{rank}.pth")
    barrier()
    if is_main:
        state.save(tmp / STATE_FILE)  # written last: its presence marks a complete checkpoint
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return final


def load_checkpoint(checkpoint: Path, model: Any, stepper: Any, scheduler: Any, rank: int) -> TrainerState:
    stepper.load_weights(model, checkpoint)
    stepper.load_optimizer(checkpoint)
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    rng_file = checkpoint / f"rng_state_{rank}.pth"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=False))
    return TrainerState.load(checkpoint / STATE_FILE)


def rotate(output_dir: Path, limit: int | None, keep: str | None) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit`, never the best one (`keep`) nor the latest."""
    if not limit:
        return []
    checkpoints = list_checkpoints(output_dir)
    removable = [c for c in checkpoints[:-1] if keep is None or c.name != Path(keep).name]
    excess = len(checkpoints) - limit
    removed = removable[: max(excess, 0)]
    for path in removed:
        shutil.rmtree(path)
    return removed
