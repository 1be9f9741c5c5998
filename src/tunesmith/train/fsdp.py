"""FSDP2 (`fsdp: full_shard | shard_grad_op | offload`): the weights, gradients and optimizer state sharded
across the processes, on GPUs (NCCL) and on CPUs (gloo) alike, so the same code is tested on either.

tunesmith shards the model itself with PyTorch's `fully_shard` (each decoder layer, then the whole model) instead
of through accelerate, which runs FSDP on GPUs only:

- Loading: only rank 0 reads the weights (into CPU memory); every other rank builds the model on the meta
  device, which allocates nothing. After sharding, the other ranks allocate their shards and rank 0 broadcasts
  the weights (and the buffers that are not in the state dict, such as rotary frequencies). No rank ever holds
  the whole model on its GPU.
- The output head is the chunked head + loss (train/head_loss.py) here too: the model's outermost weights
  (embeddings, final norm, head) stay gathered from the forward to the end of the backward.
- Saving: only what a checkpoint holds is gathered, one tensor at a time, to rank 0's CPU memory (the trainable
  tensors for LoRA; the whole model for freeze/full), so the adapter and model files are whole and used like any
  other. The optimizer state stays sharded: each rank writes its own part (`fsdp/optimizer_rank<R>.pt`), so a
  resume needs the same number of processes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from tunesmith.config import Config
from tunesmith.config.loader import ConfigError
from tunesmith.train.distributed import Stepper

log = logging.getLogger("tunesmith.train")
OPTIMIZER_FOLDER = "fsdp"


def fsdp_requested(cfg: Config) -> bool:
    return cfg.training.fsdp != "no"


def adopt_accelerate_fsdp(cfg: Config) -> None:
    """`accelerate launch` with an FSDP config: its settings become `fsdp`, and accelerate itself runs plain
    data parallelism (tunesmith shards the model), so its own FSDP wrapping and loading stay off."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if cfg.training.fsdp == "no":
        offload = os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
        # `fsdp_reshard_after_forward` is true/false, or an FSDP1 sharding strategy name
        keep = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("false", "shard_grad_op", "0")
        cfg.training.fsdp = "offload" if offload else "shard_grad_op" if keep else "full_shard"
        log.info("accelerate's FSDP config: training with fsdp: %s", cfg.training.fsdp)
    os.environ["ACCELERATE_USE_FSDP"] = "false"


def problems(cfg: Config, world: int) -> list[str]:
    """What FSDP cannot be combined with; checked before anything loads."""
    from tunesmith import stages

    t, found = cfg.training, []
    if not stages.get(cfg.finetuning.stage).shards(cfg):
        found.append(f"`fsdp` does not run stage `{cfg.finetuning.stage}` with `finetuning_type: "
                     f"{cfg.finetuning.finetuning_type}` yet: it runs pt and sft, and dpo, kto and grpo with LoRA "
                     "(their reference is the model with its adapter disabled) or without a reference; use "
                     "DeepSpeed ZeRO-3 (`deepspeed: examples/deepspeed/ds_z3_config.json`) for the rest")
    if cfg.model.infer_backend == "vllm":
        found.append("`fsdp` with `infer_backend: vllm` (grpo's vLLM rollouts) is not supported: vLLM would need the "
                     "whole adapter on every process; use data parallelism or `infer_backend: hf`")
    if t.deepspeed:
        found.append("`fsdp` and `deepspeed` both shard the model: set one of them")
    if cfg.model.quantization_bit is not None:
        found.append("`fsdp` with `quantization_bit` is not supported: a 4/8-bit base fits one GPU per process, so "
                     "train QLoRA without fsdp (data parallel)")
    if t.torch_compile:
        found.append("`fsdp` with `torch_compile` is not supported yet")
    if t.fp16:
        found.append("`fsdp` with `fp16` is not supported (no sharded loss scaling): use `bf16: true`")
    if t.fsdp == "offload" and not torch.cuda.is_available():
        found.append("`fsdp: offload` moves GPU shards to CPU memory; on a CPU run use `fsdp: full_shard`")
    if world < 2:
        found.append("`fsdp` shards across processes but this run has one: start several "
                     "(`nproc_per_node: N`, or torchrun) or set `fsdp: no`")
    return found


def load_unsharded(cfg: Config, dtype: torch.dtype, build: Callable[[Any], Any], rank: int) -> Any:
    """Rank 0 loads the weights on the CPU; the other ranks build the same model on the meta device. `build`
    adds what trains (LoRA, freeze, full) to either."""
    from tunesmith.model.loading import load_model, with_attention

    if rank == 0:
        return build(load_model(cfg, dtype, for_training=True))
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    config = AutoConfig.from_pretrained(m.model_name_or_path, trust_remote_code=m.trust_remote_code,
                                        revision=m.model_revision, cache_dir=m.cache_dir)
    with torch.device("meta"):
        model = with_attention(cfg, lambda attn: AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn, trust_remote_code=m.trust_remote_code))
    model.config.use_cache = False
    return build(model)


def layers_to_wrap(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers (the classes transformers keeps whole when it splits a model), outermost first."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names |= set(getattr(base, "_no_split_modules", None) or [])
    layers = [mod for mod in model.modules() if type(mod).__name__ in names]
    if not layers:
        raise ConfigError([f"`fsdp`: {type(base).__name__} names no decoder layer class (_no_split_modules) to "
                           "shard by; use DeepSpeed ZeRO-3 for this model"])
    return layers


def shard(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """fully_shard every decoder layer, then the model; then the weights from rank 0 to every rank's shards."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from tunesmith.train import head_loss

    rank = dist.get_rank()
    head_loss.place(model)  # the chunked head + loss (train/kernels.py switches it on after its check)
    full = model.state_dict() if rank == 0 else {}
    buffers = [name for name, _ in model.named_buffers()]
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    t = cfg.training
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": t.fsdp != "shard_grad_op"}
    if t.bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if t.fsdp == "offload":
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in layers_to_wrap(model):
        fully_shard(layer, **options)
    # the embeddings, final norm and output head stay gathered from the forward to the end of the backward, which
    # needs them first (head) and last (embeddings); so the chunked head + loss can use the head after the forward
    fully_shard(model, **{**options, "reshard_after_forward": False})
    if rank != 0:  # the shards live on the device, or in CPU memory with offload
        model.to_empty(device=torch.device("cpu") if t.fsdp == "offload" else device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for module in model.modules():  # buffers where the shards are (NCCL broadcasts device tensors only)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and device.type != "cpu" and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    for name in buffers:  # rotary frequencies and other buffers that are not in the state dict
        dist.broadcast(model.get_buffer(name), src=0)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Back to the sharded parameters. A forward without gradients (the setup checks, evaluation) leaves the
    outermost weights gathered, since no backward follows to shard them; the optimizer and the state dicts must
    see the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def to_local_state(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local().detach().cpu()
    if isinstance(value, dict):
        return {k: to_local_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_local_state(v) for v in value]
    return value


class FSDPStepper(Stepper):
    """Gradients are reduce-scattered in the backward; clipping sums the squared norms of every rank's shards."""

    owns_backward = True  # the sharded backward is FSDP's own: no parallel passes on top of it

    def __init__(self, accelerator: Any, model: Any, optimizer: Any, max_grad_norm: float, adapter: bool):
        super().__init__(accelerator, model, optimizer, max_grad_norm)
        self.adapter = adapter

    def accumulating(self, last: bool) -> Any:
        """Every micro-batch's gradients are reduce-scattered into the shards: skipping the reduction until the
        last one would keep whole gradients on every process, the memory FSDP is used to save."""
        import contextlib

        return contextlib.nullcontext()

    def update(self) -> float:
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save_weights(self, unwrapped: Any, folder: Path, is_main: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        reshard(self.model)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.adapter)
        state = get_model_state_dict(self.model, options=options)  # collective; whole tensors on rank 0 only
        if is_main:
            unwrapped.save_pretrained(folder, state_dict=state, safe_serialization=True)

    def load_weights(self, unwrapped: Any, folder: Path) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        reshard(self.model)
        saved: dict[str, torch.Tensor] = {}
        for file in sorted(folder.glob("adapter_model.safetensors" if self.adapter else "model*.safetensors")):
            saved.update(load_file(file))
        state, missing = {}, []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            key = name.replace(".default.", ".") if self.adapter else name  # peft saves without the adapter name
            if key in saved:
                state[name] = saved[key]
            else:
                missing.append(key)
        if missing:
            raise RuntimeError(f"{folder} lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def save_optimizer(self, folder: Path, is_main: bool) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        reshard(self.model)
        state = to_local_state(get_optimizer_state_dict(self.model, self.optimizer))
        (folder / OPTIMIZER_FOLDER).mkdir(exist_ok=True)
        torch.save({"world_size": dist.get_world_size(), "state": state},
                   folder / OPTIMIZER_FOLDER / f"optimizer_rank{dist.get_rank()}.pt")

    def load_optimizer(self, folder: Path) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        from torch.distributed.tensor import DTensor

        from tunesmith.train.checkpoint import safe_load

        reshard(self.model)
        file = folder / OPTIMIZER_FOLDER / f"optimizer_rank{dist.get_rank()}.pt"
        if not file.is_file():
            raise ConfigError([f"{folder} has no {OPTIMIZER_FOLDER}/{file.name}: it was not saved by an fsdp run "
                               "with this many processes; resume it as it was saved, or start a fresh output_dir"])
        saved = safe_load(file)
        if saved["world_size"] != dist.get_world_size():
            raise ConfigError([f"{folder} was saved by {saved['world_size']} fsdp processes and this run has "
                               f"{dist.get_world_size()}: resume it with {saved['world_size']}"])
        params = dict(self.model.named_parameters())
        state = saved["state"]
        for name, entry in state["state"].items():
            param = params[name]
            for key, value in entry.items():
                if isinstance(param, DTensor) and value.dim() > 0:
                    entry[key] = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                                    run_check=False, shape=param.shape, stride=param.stride())
        set_optimizer_state_dict(self.model, self.optimizer, state)
