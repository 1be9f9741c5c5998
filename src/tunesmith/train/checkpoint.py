"""Checkpoints hold everything a resume needs, and appear atomically.

checkpoint-N/ holds the trainable weights (a peft adapter, or the whole model for freeze/full), the tokenizer,
optimizer.pt (or deepspeed/ with every rank's optimizer shard), scheduler.pt, rng_state_<rank>.pth and
trainer_state.json (step, data position, best metric).
It is written as checkpoint-N.tmp-* and renamed when complete, so a killed save is never resumed from.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.errors import StopError

log = logging.getLogger("tunesmith.train")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
PARTIAL_SUFFIXES = (".tmp-save", ".tmp-delete")


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


def missing_files(checkpoint: Path) -> list[str]:
    """What a complete checkpoint has and this one lacks (empty when it can be resumed from)."""
    missing = [] if (checkpoint / STATE_FILE).is_file() else [STATE_FILE]
    if not ((checkpoint / "adapter_model.safetensors").is_file() or any(checkpoint.glob("model*.safetensors"))
            or (checkpoint / "fsdp").is_dir()):
        missing.append("weights (adapter_model.safetensors or model*.safetensors)")
    if not ((checkpoint / "optimizer.pt").is_file() or (checkpoint / "deepspeed").is_dir()
            or (checkpoint / "fsdp").is_dir()):
        missing.append("optimizer.pt")
    if not (checkpoint / "scheduler.pt").is_file():
        missing.append("scheduler.pt")
    return missing


def _numbered(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in _numbered(output_dir) if not missing_files(p)]


def incomplete_checkpoints(output_dir: Path) -> list[tuple[Path, list[str]]]:
    """checkpoint-N folders that cannot be resumed from, with what each lacks."""
    return [(p, missing) for p in _numbered(output_dir) if (missing := missing_files(p))]


def remove_partial_folders(output_dir: Path) -> list[Path]:
    """Leftovers of a save or a deletion that was killed half way."""
    if not output_dir.is_dir():
        return []
    partial = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
               and p.name.endswith(PARTIAL_SUFFIXES)]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def delete_checkpoint(path: Path) -> None:
    """Rename first (atomic: the folder stops being a checkpoint at once), then delete."""
    doomed = path.with_name(path.name + ".tmp-delete")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # numpy's array as a list: plain data
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_load(path: Path) -> Any:
    """torch.load of tensors and plain data only; anything else (pickled code) is refused with a clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise StopError(f"refusing to load {path}: it holds Python objects other than tensors and plain data, and "
                        "loading it could run code. tunesmith never writes such files; delete this checkpoint (or "
                        f"use another output_dir) unless you trust its origin.\n  detail: {str(err).splitlines()[0]}",
                        exit_code=2) from None


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
    """Called on every rank: the optimizer may be sharded (DeepSpeed), and each rank has its own RNG. A failed
    save (a full disk) removes its partial folder and stops with what was kept."""
    tmp = output_dir / f"checkpoint-{step}.tmp-save"
    try:
        return _save_checkpoint(output_dir, step, model, tokenizer, stepper, scheduler, state, rank, is_main, barrier)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        latest = f"the latest complete checkpoint is {kept[-1]}" if kept else "no complete checkpoint was kept"
        if no_space(err, output_dir):
            raise StopError(f"no space left on {output_dir} while saving checkpoint-{step}: the partial folder was "
                            f"removed and {latest}. Free some space, then run the same command again to resume."
                            ) from None
        raise StopError(f"saving checkpoint-{step} failed ({type(err).__name__}: {err}); the partial folder was "
                        f"removed and {latest}") from err


def no_space(err: BaseException, folder: Path) -> bool:
    """A full disk shows as ENOSPC, or, from torch.save's zip writer, as a RuntimeError about write positions."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False


def _save_checkpoint(output_dir: Path, step: int, model: Any, tokenizer: Any, stepper: Any, scheduler: Any,
                     state: TrainerState, rank: int, is_main: bool, barrier: Any) -> Path:
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
            delete_checkpoint(final)
        os.replace(tmp, final)
    barrier()
    return final


def load_checkpoint(checkpoint: Path, model: Any, stepper: Any, scheduler: Any, rank: int) -> TrainerState:
    stepper.load_weights(model, checkpoint)
    stepper.load_optimizer(checkpoint)
    scheduler.load_state_dict(safe_load(checkpoint / "scheduler.pt"))
    rng_file = checkpoint / f"rng_state_{rank}.pth"
    if rng_file.is_file():
        restore_rng(safe_load(rng_file))
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
        delete_checkpoint(path)
    return removed
