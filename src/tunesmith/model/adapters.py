"""Decide what trains: LoRA (plain peft adapters), freeze tuning (some layers) or full fine-tuning."""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.config.loader import ConfigError

log = logging.getLogger("tunesmith.model")


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every nn.Linear except the output head: what `lora_target: all` means."""
    head = model.get_output_embeddings()
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    return sorted(names)


def apply_lora(model: Any, cfg: Config) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    f = cfg.finetuning
    available = linear_module_names(model)
    targets = available if f.lora_target.strip() == "all" else _split(f.lora_target)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError([f"`lora_target`: no linear module named {missing} in this model; "
                           f"available: {', '.join(available)} (or `all`)"])
    if cfg.model.adapter_name_or_path:
        # Continue training the last given adapter on top of the others merged in.
        paths = _split(cfg.model.adapter_name_or_path)
        for path in paths[:-1]:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        return PeftModel.from_pretrained(model, paths[-1], is_trainable=True)
    lora = LoraConfig(task_type="CAUSAL_LM", r=f.lora_rank, lora_alpha=f.lora_alpha or 2 * f.lora_rank,
                      lora_dropout=f.lora_dropout, target_modules=targets, use_rslora=f.use_rslora,
                      use_dora=f.use_dora, modules_to_save=_split(f.additional_target) or None)
    with warnings.catch_warnings():  # peft asks transformers a question it has deprecated; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def apply_freeze(model: Any, cfg: Config) -> Any:
    f = cfg.finetuning
    n_layers = model.config.num_hidden_layers
    k = f.freeze_trainable_layers
    if k == 0 or abs(k) > n_layers:
        raise ConfigError([f"`freeze_trainable_layers` must be between -{n_layers} and {n_layers} (not 0), got {k}"])
    layers = set(range(n_layers - k, n_layers)) if k > 0 else set(range(-k))
    modules = _split(f.freeze_trainable_modules)
    extra = _split(f.freeze_extra_modules)
    layer_re = re.compile(r"\.layers\.(\d+)\.(.*)")
    matched_extra = set()
    for name, param in model.named_parameters():
        m = layer_re.search(name)
        if m:
            trainable = int(m.group(1)) in layers and (modules == ["all"] or
                                                       any(m.group(2).startswith(mod + ".") or f".{mod}." in "." + m.group(2)
                                                           for mod in modules))
        else:
            hit = [e for e in extra if f".{e}." in f".{name}"]
            matched_extra.update(hit)
            trainable = bool(hit)
        param.requires_grad_(trainable)
    if set(extra) - matched_extra:
        raise ConfigError([f"`freeze_extra_modules`: no module named {sorted(set(extra) - matched_extra)}"])
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError([f"`freeze_trainable_modules: {f.freeze_trainable_modules}` matched no parameter"])
    return model


def apply_finetuning(model: Any, cfg: Config) -> Any:
    kind = cfg.finetuning.finetuning_type
    if kind == "lora":
        model = apply_lora(model, cfg)
    elif kind == "freeze":
        model = apply_freeze(model, cfg)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    # Trainable weights stay in fp32 (autocast handles bf16/fp16 compute); frozen ones may stay in half precision.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def keep_adapter_inputs_in_half_precision(model: Any) -> None:
    """peft casts an adapter's input to the adapter's fp32 dtype; under bf16/fp16 autocast the adapter's matmuls
    cast it straight back, so the cast is a full-size copy each way for nothing (the round trip is exact). peft's
    documented switch for this is the layer attribute `cast_input_dtype_enabled`. Only for a model that then
    always runs under autocast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def parameter_counts(model: Any) -> tuple[int, int]:
    def size(p: Any) -> int:  # ZeRO-3 leaves an empty placeholder and records the real size as ds_numel
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total
