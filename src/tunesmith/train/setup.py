"""Everything the training loop needs, built in order: accelerator, tokenizer, data, model, kernels, the stage's
objective, optimizer, schedule."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from tunesmith import stages
from tunesmith.config import Config
from tunesmith.config.loader import ConfigError
from tunesmith.data.batching import BatchPlan
from tunesmith.data.pipeline import Datasets
from tunesmith.stages.base import Stage
from tunesmith.train import fsdp, kernels
from tunesmith.train.data import load_training_data
from tunesmith.train.distributed import Stepper
from tunesmith.train.memory_budget import plan_memory
from tunesmith.train.profile import Profile

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from tunesmith.data.templates import ChatTemplate

log = logging.getLogger("tunesmith.train")


class Objective(Protocol):
    """What the loop calls (train/objectives.py explains the contract)."""

    unit: str
    metric_names: tuple[str, ...]

    def collate(self, data: Any, units: list[list[int]]) -> Any: ...
    def count(self, batch: Any) -> int: ...
    def loss_sum(self, model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class Setup:
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate | None
    data: Datasets
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: BatchPlan
    eval_plan: BatchPlan | None
    total_steps: int
    stage: Stage
    objective: Objective
    stepper: Stepper
    profile: Profile


def build_optimizer(model: Any, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.training
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # biases and norm weights (1-D) are not decayed, as in transformers' Trainer
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optim == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=t.learning_rate)
    else:
        fused = t.optim == "adamw_torch_fused" and torch.cuda.is_available()
        optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                      eps=t.adam_epsilon, fused=fused or None)
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int) -> Any:
    from transformers import get_scheduler

    t = cfg.training
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)
    return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=dict(t.lr_scheduler_kwargs) or None)


@dataclass
class StageInputs:
    """What a stage's `build` receives (stages/base.py), with the kernels it may ask for."""

    cfg: Config
    model: Any
    data: Datasets
    accelerator: Any
    profile: Profile
    padding_free: bool
    pad_id: int
    kernels: dict[str, str]
    tokenizer: Any = None
    template: Any = None

    def use_chunked_head(self) -> bool:
        self.kernels["head+loss"] = kernels.use_chunked_head(self.model, self.cfg, self.accelerator)
        return self.kernels["head+loss"] == "chunked"

    def use_kept_rows(self) -> bool:
        kept = kernels.use_kept_rows(self.model, self.cfg, self.accelerator)
        self.kernels["last layer"] = "supervised rows only" if kept else "every row"
        return kept


def count_steps(plan: BatchPlan, cfg: Config, iterations: int = 1) -> int:
    """Optimizer steps of the run; `iterations` steps per accumulated batch (grpo's num_iterations)."""
    t = cfg.training
    steps_per_epoch = math.ceil(len(plan) / t.gradient_accumulation_steps) * iterations
    return t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))


def load_trainable_model(cfg: Config, accelerator: Any) -> torch.nn.Module:
    """The base model in its training dtype (quantized for QLoRA), with what trains (lora/freeze/full) set up,
    on the accelerator's device."""
    from tunesmith.model.adapters import apply_finetuning
    from tunesmith.model.loading import load_model

    t = cfg.training
    # LoRA with bf16 keeps the frozen base in bf16 (half the memory); trained weights are always fp32.
    base_dtype = torch.bfloat16 if (cfg.finetuning.finetuning_type == "lora" and t.bf16) else torch.float32
    if fsdp.fsdp_requested(cfg):  # rank 0 reads the weights, the others build on the meta device, then shard
        model = fsdp.load_unsharded(cfg, base_dtype, lambda m: apply_finetuning(m, cfg), accelerator.process_index)
        log_parameter_counts(model, accelerator)
        return fsdp.shard(model, cfg, accelerator.device)
    model = load_model(cfg, base_dtype, for_training=True, compute_dtype=compute_dtype(cfg))
    quantized = cfg.model.quantization_bit is not None
    if quantized:  # QLoRA: norms and embeddings in fp32, everything frozen before the adapters are added
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_finetuning(model, cfg)
    log_parameter_counts(model, accelerator)
    if not quantized:  # a quantized model was placed on its device when loaded and cannot be moved
        model.to(accelerator.device)
    return model


def log_parameter_counts(model: Any, accelerator: Any) -> None:
    from tunesmith.model.adapters import parameter_counts

    trainable_n, total_n = parameter_counts(model)
    if accelerator.is_main_process:
        log.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable_n, total_n,
                 100 * trainable_n / total_n)


def compute_dtype(cfg: Config) -> torch.dtype:
    t = cfg.training
    return torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32


def build_setup(cfg: Config, profile: Profile) -> Setup:
    from transformers import set_seed

    from tunesmith.model.adapters import keep_adapter_inputs_in_half_precision
    from tunesmith.train.distributed import innermost_optimizer, make_accelerator, make_stepper

    if cfg.training.bf16 and not torch.cuda.is_available():
        from tunesmith.runtime import use_bf16_on_cpu

        cfg.training.bf16 = use_bf16_on_cpu(True, cfg.model.allow_slow_bf16, "bf16: true")
    t, stage = cfg.training, stages.get(cfg.finetuning.stage)
    accelerator = make_accelerator(cfg)
    set_seed(t.seed)
    if accelerator.is_main_process:
        log.info("processes: %d (%s) on %s; %s profile", accelerator.num_processes,
                 accelerator.distributed_type.value, accelerator.device, profile.name)
    sequences = {"pairs": 2, "feedback": 2, "prompts": cfg.finetuning.num_generations}.get(stage.rows, 1)
    plan_memory(cfg, accelerator.num_processes, sequences, accelerator.is_main_process)
    tokenizer, template, data = load_training_data(cfg, stage, accelerator)
    model = load_trainable_model(cfg, accelerator)
    layers = kernels.use_liger_layers(model, cfg)
    attention = kernels.choose_attention(model, cfg, accelerator.device, compute_dtype(cfg))
    if attention is None:
        if stage.needs_packed_rows:
            raise ConfigError([f"`stage: {stage.name}` needs a model whose attention honours packed position ids "
                               "(sdpa, eager or flash_attention_2 in transformers)"])
        log.warning("this model's attention does not honour packed position ids; using padded batches")
    if t.bf16 or t.fp16:  # from here on the model runs under autocast only (the probe above did not)
        keep_adapter_inputs_in_half_precision(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chosen = {"attention": attention or "the model's own, padded batches", **({"layers": layers} if layers else {})}
    inputs = StageInputs(cfg, model, data, accelerator, profile, attention is not None, pad_id, chosen, tokenizer,
                         template)
    model, objective = stage.build(inputs)
    if accelerator.is_main_process:
        log.info("kernels: %s", ", ".join(f"{part} {name}" for part, name in chosen.items()))
    rank, world = accelerator.process_index, accelerator.num_processes
    packing_len = cfg.data.cutoff_len if cfg.data.packing else None
    plan = BatchPlan(data.train, t.per_device_train_batch_size, t.seed, True, packing_len, rank, world)
    eval_plan = None if data.eval is None else BatchPlan(data.eval, t.per_device_eval_batch_size, t.seed, False,
                                                         None, rank, world)
    if fsdp.fsdp_requested(cfg):
        fsdp.reshard(model)  # the optimizer holds the shards
    optimizer = build_optimizer(model, cfg)
    total_steps = count_steps(plan, cfg, getattr(objective, "iterations", 1))
    if t.torch_compile:
        model = torch.compile(model, dynamic=True)
    if fsdp.fsdp_requested(cfg):  # already sharded: accelerate must not wrap it for data parallelism
        optimizer = accelerator.prepare(optimizer)
        stepper: Stepper = fsdp.FSDPStepper(accelerator, model, optimizer, t.max_grad_norm,
                                            adapter=cfg.finetuning.finetuning_type == "lora")
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        stepper = make_stepper(accelerator, model, optimizer, t.max_grad_norm)
    # The schedule drives the optimizer that really steps (DeepSpeed may replace ours, e.g. with CPU Adam).
    scheduler = build_scheduler(innermost_optimizer(optimizer), cfg, total_steps)
    return Setup(accelerator, tokenizer, template, data, model, optimizer, scheduler, plan, eval_plan,
                 total_steps, stage, objective, stepper, profile)
