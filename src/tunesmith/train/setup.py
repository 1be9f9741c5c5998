"""Everything the training loop needs, built in order: accelerator, tokenizer, data, model, optimizer, schedule."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.config.loader import ConfigError
from tunesmith.data.batching import BatchPlan, collate
from tunesmith.data.pipeline import Datasets, EncodedSet, build_datasets

log = logging.getLogger("tunesmith.train")



@dataclass
class Setup:
    accelerator: Any
    tokenizer: Any
    template: Any
    data: Datasets
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: BatchPlan
    eval_plan: BatchPlan | None
    padding_free: bool
    pad_id: int
    total_steps: int
    objective: Any
    stepper: Any


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


@torch.no_grad()
def padding_free_works(model: Any, vocab_size: int) -> bool:
    """Check on two short random sequences that the packed forward equals separate forwards. Models whose
    attention ignores restarting position ids would silently attend across samples; they get padded batches."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab_size, (1, 5), generator=gen)
    b = torch.randint(0, vocab_size, (1, 7), generator=gen)
    device = next(model.parameters()).device
    sep = [model(input_ids=x.to(device), use_cache=False).logits.float() for x in (a, b)]
    packed = model(input_ids=torch.cat([a, b], 1).to(device), use_cache=False,
                   position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)).logits.float()
    model.train(was_training)
    separate = torch.cat(sep, 1)
    # relative error: attending across samples changes the second sample's logits by tens of percent, while
    # bf16/fp16 rounding stays well under 2%
    half = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    error = float((packed - separate).abs().mean() / separate.abs().mean().clamp(min=1e-6))
    return error < (2e-2 if half else 1e-4)


def zero3_sharded() -> bool:
    """Under DeepSpeed ZeRO-3 the weights are sharded at load and no forward can run before the engine exists;
    the packed-attention check is skipped and tunesmith's per-sample attention is trusted."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def use_varlen_attention(model: Any) -> None:
    """Switch to per-sample causal SDPA for packed rows (see model/attention.py)."""
    from tunesmith.model.attention import register

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(register())


def shape_bucket(cfg: Config, device: Any) -> int:
    """bf16/fp16 CPU kernels keep compiled code for every matrix shape they meet (measured: about 2 MB per shape,
    2 GB after a few hundred token counts); rounding rows to multiples of 64 tokens keeps that bounded."""
    half = cfg.training.bf16 or cfg.training.fp16
    from tunesmith.model.attention import HALF_PRECISION_BUCKET

    return HALF_PRECISION_BUCKET if half and torch.device(device).type == "cpu" else 1


def last_layer_at_kept_rows(model: Any, cfg: Config, accelerator: Any) -> bool:
    """The last layer's MLP only at supervised positions (model/kept_rows.py), where the loop allows it: not
    with gradient checkpointing, compilation, FSDP or DeepSpeed, which wrap or shard layers by their class."""
    from accelerate.utils import DistributedType

    from tunesmith.model import kept_rows

    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if sharded or cfg.training.gradient_checkpointing or cfg.training.torch_compile:
        return False
    with accelerator.autocast():
        installed = kept_rows.install(model, model.config.vocab_size)
    log.info("last layer at supervised positions only: %s", "on" if installed else "off (not a known layer)")
    return installed


@torch.no_grad()
def chunked_head_matches(model: Any, vocab_size: int) -> bool:
    """Per-position NLL of a random sequence: the chunked head + loss against the model's own logits."""
    from tunesmith.train.head_loss import installed_head, token_nll

    head = installed_head(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, 12), generator=gen).to(device)
    targets = torch.randint(0, vocab_size, (1, 12), generator=gen).to(device)
    hidden = model(input_ids=ids, use_cache=False).logits
    head.passing = False  # type: ignore[union-attr]
    logits = model(input_ids=ids, use_cache=False).logits.float()
    head.passing = True  # type: ignore[union-attr]
    model.train(was_training)
    if hidden.shape[-1] == logits.shape[-1]:
        return False
    plain = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none")
    chunked = token_nll(hidden, head, targets)[0][0]  # type: ignore[arg-type]
    half = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    return float((plain - chunked).abs().max() / plain.abs().max().clamp(min=1e-6)) < (1e-2 if half else 1e-5)


def use_chunked_head(model: Any, cfg: Config, accelerator: Any) -> bool:
    """Head + loss in chunks of positions (train/head_loss.py) where the loop allows it: not under FSDP, ZeRO-3
    (they gather the head only inside its own forward) or torch.compile."""
    from accelerate.utils import DistributedType

    from tunesmith.train import head_loss

    if accelerator.distributed_type == DistributedType.FSDP or zero3_sharded() or cfg.training.torch_compile:
        return False
    installed = head_loss.install(model, lambda m: chunked_head_matches(m, m.config.vocab_size))
    log.info("head + loss in chunks of positions: %s", "on" if installed else "off (not a plain linear head)")
    return installed


def build_objective(model: Any, cfg: Config, data: Datasets, padding_free: bool, pad_id: int,
                    accelerator: Any) -> tuple[Any, Any]:
    """The stage's objective; for rm the model gains a value head, for dpo a reference."""
    from tunesmith.train import objectives

    f = cfg.finetuning
    device = accelerator.device
    if f.stage != "rm":
        use_chunked_head(model, cfg, accelerator)
    if f.stage in ("pt", "sft"):
        return model, objectives.LMObjective(padding_free, pad_id, f.compute_accuracy, shape_bucket(cfg, device),
                                             last_layer_at_kept_rows(model, cfg, accelerator))
    if f.stage == "rm":
        from tunesmith.model.value_head import RewardModel

        reward = RewardModel(model, model.config.hidden_size, cfg.training.seed).to(device)
        return reward, objectives.RewardObjective()
    return model, objectives.DPOObjective(f.pref_beta, f.pref_loss, f.pref_ftx, f.simpo_gamma,
                                          None if f.pref_loss in ("simpo", "orpo") else reference_for(model, cfg, data))


def reference_for(model: Any, cfg: Config, data: Datasets) -> Any:
    """dpo's reference log-probabilities: LoRA -> the same model with the adapter disabled (no second copy);
    full/freeze -> a frozen copy, or a table computed once before training (`precompute_ref`)."""
    import copy

    from tunesmith.data.pairs import collate_pairs
    from tunesmith.train.objectives import sequence_logps

    if cfg.finetuning.finetuning_type == "lora":
        def with_adapter_disabled(batch: Any) -> torch.Tensor:
            peft_model = getattr(model, "module", model)
            with peft_model.disable_adapter():
                return sequence_logps(model, batch)[0]
        return with_adapter_disabled
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if not cfg.finetuning.precompute_ref:
        return lambda batch: sequence_logps(frozen, batch)[0]
    tables = {}
    device = next(frozen.parameters()).device
    with torch.no_grad():
        for split in (data.train, data.eval):
            if split is not None:
                rows = [sequence_logps(frozen, collate_pairs(split, [[i]]).to(device))[0] for i in range(len(split))]
                tables[id(split)] = torch.stack(rows)  # [pairs, 2]
    del frozen
    return PrecomputedReference(tables)


class PrecomputedReference:
    """Looks up reference log-probabilities by pair index; the batch's source set is found by identity."""

    def __init__(self, tables: dict[int, torch.Tensor]):
        self.tables = tables

    def __call__(self, batch: Any) -> torch.Tensor:
        table = self.tables[batch.source]
        return table[batch.pair_index].reshape(-1).to(batch.input_ids.device)


def count_steps(plan: BatchPlan, cfg: Config) -> int:
    t = cfg.training
    steps_per_epoch = math.ceil(len(plan) / t.gradient_accumulation_steps)
    return t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))


def load_data(cfg: Config, accelerator: Any) -> tuple[Any, Any, Datasets]:
    from tunesmith.data.templates import load_template
    from tunesmith.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    template = None if cfg.finetuning.stage == "pt" else load_template(cfg.model.template, tokenizer,
                                                                       cfg.model.default_system)
    with accelerator.main_process_first():  # rank 0 tokenizes and caches; the others read the cache
        data = build_datasets(cfg, tokenizer, template)
    report = data.report
    if accelerator.is_main_process:
        log.info("data: %d train / %s eval samples; rows skipped %s; samples dropped %s; truncated %d",
                 len(data.train), len(data.eval) if data.eval is not None else 0, dict(report.rows_bad) or 0,
                 dict(report.samples_dropped) or 0, report.truncated)
    return tokenizer, template, data


def build_setup(cfg: Config) -> Setup:
    from transformers import set_seed

    from tunesmith.model.adapters import apply_finetuning, keep_adapter_inputs_in_half_precision, parameter_counts
    from tunesmith.model.loading import load_model

    from tunesmith.train.distributed import innermost_optimizer, make_accelerator, make_stepper

    if cfg.training.bf16 and not torch.cuda.is_available():
        from tunesmith.runtime import use_bf16_on_cpu

        cfg.training.bf16 = use_bf16_on_cpu(True, cfg.model.allow_slow_bf16, "bf16: true")
    accelerator = make_accelerator(cfg)
    set_seed(cfg.training.seed)
    if accelerator.is_main_process:
        log.info("processes: %d (%s) on %s", accelerator.num_processes, accelerator.distributed_type.value,
                 accelerator.device)
    tokenizer, template, data = load_data(cfg, accelerator)
    t = cfg.training
    # LoRA with bf16 keeps the frozen base in bf16 (half the memory); trained weights are always fp32.
    base_dtype = torch.bfloat16 if (cfg.finetuning.finetuning_type == "lora" and t.bf16) else torch.float32
    compute_dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32
    model = load_model(cfg, base_dtype, for_training=True, compute_dtype=compute_dtype)
    quantized = cfg.model.quantization_bit is not None
    if quantized:  # QLoRA: norms and embeddings in fp32, everything frozen before the adapters are added
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_finetuning(model, cfg)
    trainable_n, total_n = parameter_counts(model)
    if accelerator.is_main_process:
        log.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable_n, total_n,
                 100 * trainable_n / total_n)
    if not quantized:  # a quantized model was placed on its device when loaded and cannot be moved
        model.to(accelerator.device)
    padding_free = cfg.model.attn_implementation == "flash_attention_2" or zero3_sharded() or padding_free_works(
        model, model.config.vocab_size)
    if not padding_free:
        if cfg.finetuning.stage in ("rm", "dpo"):
            raise ConfigError([f"`stage: {cfg.finetuning.stage}` needs a model whose attention honours packed "
                               "position ids (sdpa, eager or flash_attention_2 in transformers)"])
        log.warning("this model's attention does not honour packed position ids; using padded batches")
    elif cfg.model.attn_implementation in ("auto", "sdpa"):
        use_varlen_attention(model)
    if t.bf16 or t.fp16:  # from here on the model runs under autocast only (the probe above did not)
        keep_adapter_inputs_in_half_precision(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model, objective = build_objective(model, cfg, data, padding_free, pad_id, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    packing_len = cfg.data.cutoff_len if cfg.data.packing else None
    plan = BatchPlan(data.train, t.per_device_train_batch_size, t.seed, True, packing_len, rank, world)
    eval_plan = None if data.eval is None else BatchPlan(data.eval, t.per_device_eval_batch_size, t.seed, False,
                                                         None, rank, world)
    optimizer = build_optimizer(model, cfg)
    total_steps = count_steps(plan, cfg)
    if t.torch_compile:
        model = torch.compile(model, dynamic=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The schedule drives the optimizer that really steps (DeepSpeed may replace ours, e.g. with CPU Adam).
    scheduler = build_scheduler(innermost_optimizer(optimizer), cfg, total_steps)
    stepper = make_stepper(accelerator, model, optimizer, t.max_grad_norm)
    return Setup(accelerator, tokenizer, template, data, model, optimizer, scheduler, plan, eval_plan,
                 padding_free, pad_id, total_steps, objective, stepper)
