"""Checks that need several fields at once. Each returns every problem, never stops at the first."""

from __future__ import annotations

from pathlib import Path

from tunesmith import stages
from tunesmith.config.fields import Config
from tunesmith.config.loader import ConfigError


def _cuda_available() -> bool:
    import torch  # deferred: `tunesmith --help` must stay instant

    return torch.cuda.is_available()


def check_model(cfg: Config) -> list[str]:
    problems = []
    if not cfg.model.model_name_or_path:
        problems.append("`model_name_or_path` is required: the base model folder")
    from tunesmith.data.templates import template_problem

    template = template_problem(cfg.model.template)
    if template:
        problems.append(f"`template`: {template}")
    if cfg.model.enable_liger_kernel:
        problems += liger_problems()
    tags = [t.strip() for t in cfg.data.reasoning_tags.split(",")]
    if len(tags) != 2 or not all(tags):
        problems.append(f"`reasoning_tags` must be two tags, comma separated (e.g. `<think>,</think>`), got "
                        f"`{cfg.data.reasoning_tags}`")
    return problems


LIGER_MIN = (0, 8, 2)  # its fused linear cross-entropy's gradients with reduction="none" are right from 0.8.2


def liger_problems() -> list[str]:
    import importlib.util

    if not _cuda_available():
        return ["`enable_liger_kernel`: Liger's kernels are Triton kernels for CUDA GPUs and none is visible; remove "
                "it here (the CPU's head + loss is chunked already)"]
    if importlib.util.find_spec("liger_kernel") is None:
        return ["`enable_liger_kernel` needs the liger-kernel package: pip install 'tunesmith[liger]'"]
    from importlib.metadata import version

    found = version("liger-kernel")
    if tuple(int(p) for p in found.split(".")[:3] if p.isdigit()) < LIGER_MIN:
        return [f"`enable_liger_kernel`: liger-kernel {found} computes wrong gradients for per-token losses; "
                "pip install 'tunesmith[liger]' (0.8.2 or newer)"]
    return []


def check_data(cfg: Config, need_dataset: bool = True) -> list[str]:
    d = cfg.data
    problems = []
    if need_dataset and not d.dataset:
        problems.append("`dataset` is required: one or more names from dataset_info.json, comma separated")
    if d.cutoff_len < 8:
        problems.append(f"`cutoff_len` must be at least 8, got {d.cutoff_len}")
    if d.val_size < 0:
        problems.append(f"`val_size` must be >= 0, got {d.val_size}")
    if d.val_size >= 1 and not float(d.val_size).is_integer():
        problems.append(f"`val_size` >= 1 is a sample count and must be whole, got {d.val_size}")
    if d.val_size > 0 and d.eval_dataset:
        problems.append("give either `val_size` or `eval_dataset`, not both")
    if d.max_samples is not None and d.max_samples <= 0:
        problems.append(f"`max_samples` must be positive, got {d.max_samples}")
    if d.interleave_probs and d.mix_strategy == "concat":
        problems.append("`interleave_probs` needs `mix_strategy: interleave_under` or `interleave_over`")
    return problems + stages.get(cfg.finetuning.stage).check(cfg)


def check_training(cfg: Config) -> list[str]:
    t, problems = cfg.training, []
    if not t.output_dir:
        problems.append("`output_dir` is required: where checkpoints and the trained model go")
    if t.fp16 and t.bf16:
        problems.append("choose one of `fp16` and `bf16`")
    if t.fp16 and not _cuda_available():
        problems.append("`fp16` needs a CUDA GPU and none is visible; use `bf16: true` (fast on CPUs with AMX) "
                        "or neither (fp32)")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps"):
        if getattr(t, key) < 1:
            problems.append(f"`{key}` must be at least 1, got {getattr(t, key)}")
    if t.learning_rate < 0:
        problems.append(f"`learning_rate` must be >= 0, got {t.learning_rate}")
    if t.warmup_steps < 0:
        problems.append(f"`warmup_steps` must be >= 0, got {t.warmup_steps}")
    if not 0 <= t.seed < 2**32:
        problems.append(f"`seed` must be between 0 and 2^32 - 1, got {t.seed}")
    if t.max_grad_norm < 0:
        problems.append(f"`max_grad_norm` must be >= 0 (0 disables clipping), got {t.max_grad_norm}")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        problems.append("set `num_train_epochs` > 0 or `max_steps` > 0")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"`warmup_ratio` must be in [0, 1), got {t.warmup_ratio}")
    if t.eval_steps is not None and t.eval_steps < 1:
        problems.append(f"`eval_steps` must be at least 1, got {t.eval_steps}")
    has_eval_data = cfg.data.val_size > 0 or bool(cfg.data.eval_dataset)
    if t.eval_strategy != "no" and not has_eval_data:
        problems.append(f"`eval_strategy: {t.eval_strategy}` needs evaluation data: set `val_size` or `eval_dataset`")
    if t.do_eval and not has_eval_data:
        problems.append("`do_eval` needs evaluation data: set `val_size` or `eval_dataset`")
    if t.load_best_model_at_end:
        eval_steps = t.eval_steps or t.logging_steps
        if t.eval_strategy == "no":
            problems.append("`load_best_model_at_end` needs evaluation: set `eval_strategy` (steps or epoch)")
        elif t.save_strategy != t.eval_strategy:
            problems.append(f"`load_best_model_at_end` needs `save_strategy` equal to `eval_strategy` "
                            f"({t.save_strategy} vs {t.eval_strategy}) so every evaluated model is saved")
        elif t.eval_strategy == "steps" and t.save_steps % eval_steps != 0:
            problems.append(f"`load_best_model_at_end` needs `save_steps` ({t.save_steps}) to be a multiple of "
                            f"`eval_steps` ({eval_steps})")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        problems.append(f"`save_total_limit` must be at least 1, got {t.save_total_limit}")
    if t.lr_scheduler_type == "cosine_with_min_lr":
        kwargs = t.lr_scheduler_kwargs
        if not ({"min_lr", "min_lr_rate"} & set(kwargs)):
            problems.append("`cosine_with_min_lr` needs `lr_scheduler_kwargs: {min_lr_rate: 0.1}` (or min_lr)")
    if cfg.generation.predict_with_generate and stages.get(cfg.finetuning.stage).predict != "generate":
        problems.append(f"`predict_with_generate` does not apply to `stage: {cfg.finetuning.stage}`: it needs a "
                        "stage that generates answers (" + ", ".join(stages.predicting("generate")) + ")")
    if t.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            problems.append("`report_to: tensorboard` needs the tensorboard package: pip install tensorboard")
    if t.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            problems.append("`report_to: wandb` needs the wandb package: pip install wandb")
    return problems


def check_finetuning(cfg: Config) -> list[str]:
    f, problems = cfg.finetuning, []
    if f.lora_rank < 1:
        problems.append(f"`lora_rank` must be at least 1, got {f.lora_rank}")
    if f.lora_alpha is not None and f.lora_alpha <= 0:
        problems.append(f"`lora_alpha` must be positive, got {f.lora_alpha}")
    hidden = model_config(cfg).get("hidden_size")
    if f.finetuning_type == "lora" and isinstance(hidden, int) and f.lora_rank > hidden:
        problems.append(f"`lora_rank` ({f.lora_rank}) exceeds the model's hidden size ({hidden}); a rank that "
                        "large trains nothing a full fine-tune would not: use a rank such as 8-64")
    if not 0 <= f.lora_dropout < 1:
        problems.append(f"`lora_dropout` must be in [0, 1), got {f.lora_dropout}")
    bits = cfg.model.quantization_bit
    if bits is not None and bits not in (4, 8):
        problems.append(f"`quantization_bit` must be 4 or 8, got {bits}")
    if bits is not None and f.finetuning_type != "lora":
        problems.append(f"`quantization_bit: {bits}` trains only LoRA adapters (QLoRA): set `finetuning_type: lora`")
    if cfg.model.adapter_name_or_path and f.finetuning_type != "lora":
        problems.append("`adapter_name_or_path` (checkpoint_dir) needs `finetuning_type: lora`")
    for path in cfg.adapter_paths():
        if not Path(path).exists():
            problems.append(f"adapter folder `{path}` does not exist")
        elif not (Path(path) / "adapter_config.json").is_file():
            problems.append(f"`adapter_name_or_path`: `{path}` holds no LoRA adapter (no adapter_config.json); point "
                            "it at a folder written by `tunesmith train` with `finetuning_type: lora`, or at one "
                            "of its checkpoint-N folders")
    return problems


def model_config(cfg: Config) -> dict:
    """The model folder's config.json, read without loading anything ({} for a hub id or an unreadable file)."""
    import json

    path = Path(str(cfg.model.model_name_or_path or "")).expanduser() / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_serve(cfg: Config) -> list[str]:
    s, problems = cfg.serve, []
    if not 0 < s.port < 65536:
        problems.append(f"`port` must be between 1 and 65535, got {s.port}")
    if s.max_request_bytes < 1024:
        problems.append(f"`max_request_bytes` must be at least 1024, got {s.max_request_bytes}")
    if not s.queue_timeout >= 0:
        problems.append(f"`queue_timeout` must be >= 0 seconds (0 = wait forever), got {s.queue_timeout}")
    return problems


def raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def validate_for_train(cfg: Config) -> None:
    raise_if(check_model(cfg) + check_data(cfg) + check_finetuning(cfg) + check_training(cfg))


def validate_for_data(cfg: Config) -> None:
    raise_if(check_model(cfg) + check_data(cfg) + check_finetuning(cfg))
