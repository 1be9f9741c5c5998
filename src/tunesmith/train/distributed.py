"""Where the loop differs between process setups: one process / DDP (accelerate), DeepSpeed ZeRO, or FSDP.

tunesmith drives no collective itself: accelerate wraps the model for DDP, DeepSpeed's engine reduces,
partitions and clips gradients, FSDP2 (train/fsdp.py) reduce-scatters in the backward. The loop asks a `Stepper`
for three things (a backward, the accumulation context, the update) and the checkpoint code asks it to save or
load weights and optimizer state; only the DeepSpeed and FSDP steppers know about sharding. DeepSpeed config
files are LLaMA-Factory's: "auto" values are filled from the tunesmith config, explicit values that contradict
it are an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.config.loader import ConfigError

DS_CHECKPOINT_TAG = "deepspeed"


def deepspeed_requested(cfg: Config) -> bool:
    """`deepspeed: file.json` in the config, or `accelerate launch` with a DeepSpeed accelerate config."""
    return bool(cfg.training.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def load_deepspeed_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError([f"`deepspeed`: {file} does not exist (shipped examples: examples/deepspeed/*.json)"])
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError([f"`deepspeed`: {file} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})"]) from None
    if not isinstance(config, dict):
        raise ConfigError([f"`deepspeed`: {file} must hold a JSON object"])
    return config


def fill_deepspeed_config(ds: dict[str, Any], cfg: Config, world: int, source: str) -> dict[str, Any]:
    """Replace "auto" (or absent) values with tunesmith's; explicit values must agree with the config."""
    t = cfg.training
    problems = [f"{source}: remove the `{key}` section: tunesmith builds the {key} from `optim`, "
                "`learning_rate` and `lr_scheduler_type`" for key in ("optimizer", "scheduler") if key in ds]
    wanted = {
        ("train_micro_batch_size_per_gpu",): t.per_device_train_batch_size,
        ("gradient_accumulation_steps",): t.gradient_accumulation_steps,
        ("train_batch_size",): t.per_device_train_batch_size * t.gradient_accumulation_steps * world,
        ("gradient_clipping",): float(t.max_grad_norm),
        ("bf16", "enabled"): bool(t.bf16),
        ("fp16", "enabled"): bool(t.fp16),
    }
    for path, value in wanted.items():
        node = ds
        for key in path[:-1]:
            node = node.setdefault(key, {})
        current = node.get(path[-1], "auto")
        if current == "auto":
            node[path[-1]] = value
        elif current != value:
            problems.append(f"{source}: `{'.'.join(path)}` is {current!r} but the tunesmith config gives {value!r}; "
                            "set it to \"auto\" or make the two agree")
    if problems:
        raise ConfigError(problems)
    return ds


def ensure_process_group_env() -> None:
    """DeepSpeed always runs in a process group; a plain `tunesmith train` becomes a group of one."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def make_accelerator(cfg: Config) -> Any:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    t = cfg.training
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "no"
    timeout = timedelta(seconds=t.ddp_timeout)
    if not deepspeed_requested(cfg):
        if "WORLD_SIZE" not in os.environ:
            # accelerate keeps one process-wide state and refuses another precision for a later run in the same
            # process (the Python API, tests); a single process has no group to keep, so start it afresh
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
        return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                           kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    ensure_process_group_env()
    world = int(os.environ["WORLD_SIZE"])
    filled = None  # checked before the slow DeepSpeed import, so a bad file fails fast
    if t.deepspeed:
        filled = fill_deepspeed_config(load_deepspeed_config(t.deepspeed), cfg, world, t.deepspeed)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(["DeepSpeed is not installed: pip install 'tunesmith[deepspeed]'"]) from None
    if filled is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=filled)
    else:  # configured by `accelerate launch --config_file` through the environment
        plugin = DeepSpeedPlugin()
        fill_deepspeed_config(plugin.deepspeed_config, cfg, world, "the accelerate DeepSpeed config")
    # On a CPU-only machine accelerate's `cpu=True` would ignore DeepSpeed; gloo is DeepSpeed's CPU backend.
    backend = None if torch.cuda.is_available() else "gloo"
    return Accelerator(mixed_precision=precision, deepspeed_plugin=plugin,
                       gradient_accumulation_steps=t.gradient_accumulation_steps,
                       kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timeout)])


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that owns the param groups (under accelerate's and DeepSpeed's wrappers)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class Stepper:
    """One process or DDP through accelerate: backward per micro-batch, then clip and step."""

    owns_backward = False  # DeepSpeed and FSDP run the backward and its reduction themselves

    def __init__(self, accelerator: Any, model: Any, optimizer: Any, max_grad_norm: float):
        self.acc, self.model, self.optimizer = accelerator, model, optimizer
        # read after `prepare`: FSDP replaces the parameters it shards
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")

    def accumulating(self, last: bool) -> Any:
        """Gradients are only synchronised across ranks on the last micro-batch of a step."""
        return contextlib.nullcontext() if last else self.acc.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def update(self) -> float:
        grad_norm = self.acc.clip_grad_norm_(self.trainable, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    # Every method below is called on every rank.
    def save_weights(self, unwrapped: Any, folder: Path, is_main: bool) -> None:
        from tunesmith.train.checkpoint import save_weights

        if is_main:
            save_weights(unwrapped, folder)

    def load_weights(self, unwrapped: Any, folder: Path) -> None:
        from tunesmith.train.checkpoint import load_trainable_weights

        load_trainable_weights(unwrapped, folder)

    def save_optimizer(self, folder: Path, is_main: bool) -> None:
        if is_main:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load_optimizer(self, folder: Path) -> None:
        from tunesmith.train.checkpoint import safe_load

        self.optimizer.load_state_dict(safe_load(folder / "optimizer.pt"))


def holds_adapter(model: Any) -> bool:
    """A peft model, or a reward model around one: its checkpoints hold the trainable tensors only."""
    return hasattr(model, "peft_config") or hasattr(getattr(model, "lm", None), "peft_config")


class DeepSpeedStepper(Stepper):
    """DeepSpeed's engine owns reduction, clipping and the optimizer step; its optimizer state is sharded, so
    every rank saves its own shard (checkpoint-N/deepspeed/)."""

    owns_backward = True

    def accumulating(self, last: bool) -> Any:
        self.model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already normalised over the whole accumulated batch: no extra division by accumulation.
        self.model.backward(loss, scale_wrt_gas=False)

    def update(self) -> float:
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def gathered(self, modify: bool) -> Any:
        """ZeRO-3 shards the parameters themselves: gather (on all ranks) the ones a checkpoint holds, whole. A LoRA
        checkpoint holds the trainable tensors only, so the frozen base is never gathered to save or load it."""
        if self.model.zero_optimization_stage() != 3:
            return contextlib.nullcontext()
        import deepspeed

        params = list(self.model.module.parameters())
        if holds_adapter(self.model.module):
            params = [p for p in params if p.requires_grad]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def save_weights(self, unwrapped: Any, folder: Path, is_main: bool) -> None:
        whole_model = not (holds_adapter(unwrapped) or hasattr(unwrapped, "load_head"))  # not a reward model
        if self.model.zero_optimization_stage() == 3 and whole_model:
            # gathered one module at a time into rank 0's CPU memory: the model is never whole on any device
            state = self.model._zero3_consolidated_16bit_state_dict()
            if is_main:
                unwrapped.save_pretrained(folder, state_dict=state, safe_serialization=True)
            return
        with self.gathered(modify=False):
            super().save_weights(unwrapped, folder, is_main)

    def load_weights(self, unwrapped: Any, folder: Path) -> None:
        with self.gathered(modify=True):
            super().load_weights(unwrapped, folder)

    def save_optimizer(self, folder: Path, is_main: bool) -> None:
        self.model.save_checkpoint(str(folder), tag=DS_CHECKPOINT_TAG, save_latest=False,
                                   exclude_frozen_parameters=True)

    def load_optimizer(self, folder: Path) -> None:
        if not (folder / DS_CHECKPOINT_TAG).is_dir():
            raise ConfigError([f"{folder} was not saved by a DeepSpeed run (no {DS_CHECKPOINT_TAG}/ folder); "
                               "resume it without `deepspeed`, or start a fresh output_dir"])
        self.model.load_checkpoint(str(folder), tag=DS_CHECKPOINT_TAG, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)


def make_stepper(accelerator: Any, model: Any, optimizer: Any, max_grad_norm: float) -> Stepper:
    from accelerate.utils import DistributedType

    kind = DeepSpeedStepper if accelerator.distributed_type == DistributedType.DEEPSPEED else Stepper
    return kind(accelerator, model, optimizer, max_grad_norm)
