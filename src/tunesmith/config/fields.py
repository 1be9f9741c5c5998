"""The typed config: every setting tunesmith knows, its type, default and help, written once.

YAML files, `key=value` overrides, `--flag value` arguments and `--help` text are all derived from these
dataclasses. Keys are flat (as in LLaMA-Factory): each key lives in exactly one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tunesmith.stages import NAMES as STAGE_NAMES
from tunesmith.stages import summary as stage_summary


def opt(default: Any, help: str) -> Any:
    """A config field with its help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArgs:
    """Which model, adapters and chat template to use."""

    model_name_or_path: str | None = opt(None, "Base model: a local folder (or a hub id when online).")
    adapter_name_or_path: str | None = opt(
        None, "LoRA adapter folder(s) to load on top of the base model, comma separated, applied in order.")
    template: str = opt(
        "auto",
        "Chat template: `auto` uses the tokenizer's own jinja template; or a named one "
        "(default, vanilla, empty, alpaca, chatml, llama3, qwen); or a LLaMA-Factory name (qwen3, qwen3_nothink, "
        "deepseekr1, mistral, gemma3, phi, glm4, ...: the model's own template with that name's settings); or a "
        "path to a .jinja file.",
    )
    enable_thinking: bool = opt(
        True, "Reasoning models: train (and generate) the reasoning part of answers; false drops the reasoning "
        "from the data and asks the template for its no-thinking form (as LLaMA-Factory's key).")
    template_kwargs: dict = opt(
        {}, "Extra variables for the chat template, e.g. {thinking: true} or {tools_in_user_message: false}; "
        "saved with the model so inference renders prompts the same way.")
    default_system: str | None = opt(None, "System prompt used when a sample has none.")
    trust_remote_code: bool = opt(False, "Allow model code shipped in the model folder to run.")
    model_revision: str = opt("main", "Model revision (branch, tag or commit) when loading from a hub.")
    cache_dir: str | None = opt(None, "Where downloaded models are cached (hub models only).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = opt(
        "auto", "Attention kernel; `auto` = sdpa, with per-sample attention over packed rows in training.")
    enable_liger_kernel: bool = opt(False, "Training on CUDA GPUs with the liger-kernel package: Liger's fused "
                                    "linear cross-entropy as the head + loss, and its RMSNorm, SwiGLU and RoPE.")
    infer_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weights dtype for inference commands (predict, chat, serve, eval).")
    infer_backend: Literal["hf", "vllm"] = opt("hf", "Generation engine for predict/chat/serve.")
    vllm_maxlen: int = opt(4096, "vLLM: longest prompt + answer in tokens (its max_model_len).")
    vllm_gpu_util: float = opt(0.9, "vLLM: share of GPU memory it may take (weights, KV cache).")
    vllm_enforce_eager: bool = opt(False, "vLLM: no CUDA graphs (less memory, slower decoding).")
    vllm_max_lora_rank: int | None = opt(
        None, "vLLM: largest LoRA rank it accepts; default: the adapter's own rank (vLLM's default is 16).")
    vllm_config: dict = opt({}, "vLLM: extra engine arguments, e.g. {tensor_parallel_size: 2}; default tensor "
                                "parallelism is every visible GPU.")
    quantization_bit: int | None = opt(
        None, "Load the base model quantized to 4 or 8 bits with bitsandbytes (QLoRA when training with LoRA; "
        "also for predict, chat, serve and eval). Needs `pip install bitsandbytes`.")
    quantization_method: Literal["bnb", "bitsandbytes"] = opt("bnb", "Quantization library (bitsandbytes).")
    quantization_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type: nf4 (QLoRA's) or fp4.")
    double_quantization: bool = opt(True, "4-bit: quantize the quantization constants too (saves memory).")
    allow_slow_bf16: bool = opt(
        False, "On a CPU without native bf16 (no AVX-512 BF16 or AMX), tunesmith computes in fp32 where bf16 (or "
        "fp16) was asked for, with a warning, because emulated half precision is far slower; true keeps bf16.")


@dataclass
class DataArgs:
    """Where the data comes from and how it becomes token ids."""

    dataset: str | None = opt(None, "Training dataset name(s) from dataset_info.json, comma separated.")
    eval_dataset: str | None = opt(None, "Evaluation dataset name(s), comma separated (instead of val_size).")
    dataset_dir: str = opt("data", "Folder holding dataset_info.json and the dataset files.")
    cutoff_len: int = opt(2048, "Longest rendered token sequence; longer samples are truncated or dropped.")
    truncation: Literal["truncate", "drop"] = opt(
        "truncate", "Over-long samples: `truncate` keeps whole turns that fit (cutting content, never the "
        "end-of-turn token or headers); `drop` skips them. Both are counted in the log."
    )
    max_samples: int | None = opt(None, "Use at most this many rows of each dataset (the first ones).")
    val_size: float = opt(0.0, "Held-out share (< 1) or count (>= 1) of the training data, split with `seed`.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = opt(
        "concat", "How several datasets combine: concatenated, or interleaved until the shortest "
        "(under) or longest (over) is used up."
    )
    interleave_probs: str | None = opt(None, "Sampling weights for interleaving, comma separated.")
    reasoning_tags: str = opt(
        "<think>,</think>", "The tags that open and close a reasoning block at the start of an answer's text, "
        "comma separated (the block becomes the turn's reasoning).")
    train_on_prompt: bool = opt(False, "Also compute the loss on prompt tokens (system, user, tool output).")
    mask_history: bool = opt(False, "Train only on the last assistant turn of each conversation.")
    packing: bool = opt(
        False, "Pack several samples into rows of up to cutoff_len tokens (attention stays within each "
        "sample). Without it each batch is still padding-free."
    )
    on_bad_row: Literal["error", "skip"] = opt(
        "error", "A malformed row stops the run with its location (`error`) or is skipped and counted (`skip`)."
    )
    overwrite_cache: bool = opt(False, "Rebuild the tokenized dataset cache.")
    data_cache_dir: str | None = opt(None, "Tokenized dataset cache; default ~/.cache/tunesmith/data.")
    preprocessing_num_workers: int | None = opt(None, "Accepted for compatibility; tokenization runs in-process.")


@dataclass
class FinetuningArgs:
    """What is trained and how."""

    stage: Literal[STAGE_NAMES] = opt("sft", "Training stage: " + stage_summary() + ".")
    finetuning_type: Literal["lora", "freeze", "full"] = opt("lora", "Which parameters train.")
    lora_target: str = opt(
        "all", "Modules that get LoRA: comma separated names (q_proj,v_proj) or `all` (every linear layer but "
        "the output head)."
    )
    lora_rank: int = opt(8, "LoRA rank.")
    lora_alpha: int | None = opt(None, "LoRA scale numerator; default 2 x lora_rank.")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.")
    additional_target: str | None = opt(
        None, "Extra modules trained in full and saved with the adapter, comma separated (e.g. embed_tokens)."
    )
    use_rslora: bool = opt(False, "Rank-stabilised LoRA scaling (alpha / sqrt(rank)).")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA).")
    freeze_trainable_layers: int = opt(
        2, "Freeze tuning: train the last N layers (N > 0) or the first -N layers (N < 0).")
    freeze_trainable_modules: str = opt(
        "all", "Freeze tuning: which modules of the trainable layers train (comma list, or `all`).")
    freeze_extra_modules: str | None = opt(
        None, "Freeze tuning: extra non-layer modules that train too (e.g. embed_tokens,norm)."
    )
    plot_loss: bool = opt(False, "Save training_loss.png and training_eval_loss.png in output_dir.")
    compute_accuracy: bool = opt(False, "pt/sft: also report token accuracy (the most likely token is the label).")
    pref_beta: float = opt(0.1, "dpo, kto, grpo: strength of the pull towards the reference model (beta; grpo: "
                           "0 keeps no reference).")
    pref_loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = opt(
        "sigmoid", "dpo: preference loss (sigmoid = DPO; simpo and orpo need no reference model).")
    pref_ftx: float = opt(0.0, "dpo: weight of an extra sft loss on the chosen answers.")
    simpo_gamma: float = opt(0.5, "dpo with pref_loss simpo: target reward margin.")
    kto_chosen_weight: float = opt(1.0, "kto: weight of the desirable samples' loss.")
    kto_rejected_weight: float = opt(1.0, "kto: weight of the undesirable samples' loss.")
    num_generations: int = opt(8, "grpo: answers sampled per prompt (a group; advantages are relative to it).")
    num_iterations: int = opt(1, "grpo: optimizer steps on each batch of sampled answers (clipped ratio from the 2nd).")
    grpo_epsilon: float = opt(0.2, "grpo: clip range of the probability ratio (1 - e, 1 + e).")
    reward_funcs: str = opt(
        "math_answer", "grpo: reward functions, comma separated: exact_match, math_answer, regex_format, "
        "length_penalty, or module:function (your Python callable).")
    reward_weights: str | None = opt(None, "grpo: a weight per reward function, comma separated (default 1 each).")
    reward_regex: str = opt(r"####\s*-?\d+\s*$", "grpo: the pattern regex_format rewards (re.search, DOTALL).")
    precompute_ref: bool = opt(
        False, "dpo, kto, full/freeze tuning: compute the reference log-probabilities once before training instead of "
        "keeping a frozen copy of the model.")


@dataclass
class TrainingArgs:
    """The optimisation loop, its schedule and where results go."""

    output_dir: str | None = opt(None, "Where checkpoints, logs and the final model go.")
    overwrite_output_dir: bool = opt(False, "Allow writing into a non-empty output_dir that has no checkpoint.")
    do_train: bool = opt(True, "Train (classic flag; `tunesmith train` trains unless do_train is false).")
    do_eval: bool = opt(False, "Evaluate on the eval split after training.")
    do_predict: bool = opt(False, "Generate predictions on the dataset (see `tunesmith predict`).")
    per_device_train_batch_size: int = opt(8, "Samples per micro-batch per device.")
    per_device_eval_batch_size: int = opt(8, "Samples per evaluation batch per device.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    max_tokens_per_forward: int | Literal["auto"] = opt(
        "auto", "Run each optimizer step's samples (all its micro-batches) as forward/backward passes of at most "
        "this many tokens (whole samples, packed first-fit decreasing): the same gradients, with the activation "
        "peak of a long-tailed batch bounded; 0 = one pass per micro-batch; `auto` = 0 where the estimated peak "
        "fits the device's memory, else the most that fits (docs/training.md, memory).")
    cpu_memory_pool: bool = opt(
        True, "CPU: serve tensors of 256 KB or more from tunesmith's memory pool (best fit, pages kept for the next "
        "pass) instead of malloc, whose heap fragments under passes of varying length. Compiled on first use (needs "
        "a C++ compiler; falls back to malloc with a warning).")
    trim_cpu_heap: bool = opt(
        False, "CPU: hand free memory pages back to the OS (the pool's, and glibc's with malloc_trim) before each "
        "forward/backward pass: lower peak RSS, paid for in time re-faulting those pages.")
    parallel_passes: int = opt(
        1, "CPU, one process: run this many forward/backward passes of a step at once, each on its share of the "
        "cores (the step's samples dealt out by cost, gradients added in a fixed order). Can pay for small models, "
        "whose kernels use several cores poorly; measure it on your CPU (benchmarks/). With "
        "max_tokens_per_forward, at most that many tokens are in flight at once (longer samples run alone on all "
        "cores); without it, one set of activations per pass.")
    learning_rate: float = opt(5e-5, "Peak learning rate.")
    num_train_epochs: float = opt(3.0, "Epochs to train (fractions allowed); ignored when max_steps > 0.")
    max_steps: int = opt(-1, "Optimizer steps to train; overrides num_train_epochs when > 0.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"
    ] = opt("linear", "Learning-rate schedule after warm-up.")
    lr_scheduler_kwargs: dict = opt({}, "Extra schedule settings, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr.")
    warmup_ratio: float = opt(0.0, "Warm-up as a share of all optimizer steps.")
    warmup_steps: int = opt(0, "Warm-up steps (wins over warmup_ratio when > 0).")
    weight_decay: float = opt(0.0, "Decoupled weight decay (not applied to biases and norms).")
    adam_beta1: float = opt(0.9, "Adam beta1.")
    adam_beta2: float = opt(0.999, "Adam beta2.")
    adam_epsilon: float = opt(1e-8, "Adam epsilon.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this value (0 disables clipping).")
    optim: Literal["adamw_torch", "adamw_torch_fused", "sgd"] = opt("adamw_torch", "Optimizer.")
    seed: int = opt(42, "Seed for initialisation, shuffling, splits and dropout.")
    bf16: bool = opt(False, "bfloat16 autocast (CPUs with AMX and recent GPUs run it much faster).")
    fp16: bool = opt(False, "float16 autocast with loss scaling (CUDA GPUs only).")
    gradient_checkpointing: bool | Literal["auto"] = opt(
        "auto", "Recompute activations in the backward pass to save memory; `auto` turns it on only where the "
        "estimated peak would not fit the device's memory otherwise (docs/training.md, memory).")
    torch_compile: bool = opt(False, "Compile the model with torch.compile.")
    logging_steps: int = opt(10, "Log every N optimizer steps.")
    eval_strategy: Literal["no", "steps", "epoch"] = opt("no", "When to evaluate during training.")
    eval_steps: int | None = opt(None, "Evaluate every N steps (default: logging_steps).")
    save_strategy: Literal["no", "steps", "epoch"] = opt("steps", "When to save checkpoints.")
    save_steps: int = opt(500, "Save a checkpoint every N steps.")
    save_total_limit: int | None = opt(None, "Keep at most N checkpoints (the best one is never removed).")
    load_best_model_at_end: bool = opt(False, "Finish with the best checkpoint by metric_for_best_model.")
    metric_for_best_model: str = opt("eval_loss", "Metric that picks the best checkpoint.")
    greater_is_better: bool | None = opt(None, "Whether a larger metric is better (default: not for losses).")
    resume_from_checkpoint: str | None = opt(
        None, "Checkpoint folder to resume from; by default the last checkpoint in output_dir is resumed."
    )
    report_to: Literal["none", "tensorboard", "wandb"] = opt("none", "Experiment tracker.")
    run_name: str | None = opt(None, "Run name for the tracker.")
    logging_dir: str | None = opt(None, "TensorBoard folder (default: output_dir/runs).")
    dataloader_num_workers: int = opt(0, "Accepted for compatibility; batches are built in-process.")
    nproc_per_node: int | None = opt(
        None, "Training processes on this machine; default one per visible GPU (1 on a CPU). With more than one, "
        "a plain `tunesmith train` starts them with torchrun itself; 1 keeps a single process.")
    ddp_timeout: int = opt(1800, "Seconds a rank waits for the others before failing.")
    deepspeed: str | None = opt(None, "DeepSpeed config JSON (ZeRO 0/2/3, offload); \"auto\" values are filled "
                                      "from this config. Launch with torchrun or accelerate launch.")
    fsdp: Literal["no", "full_shard", "shard_grad_op", "offload"] = opt(
        "no", "Shard weights, gradients and optimizer state across processes with FSDP2 (GPUs or CPUs): full_shard; "
        "shard_grad_op keeps weights gathered from forward to backward; offload keeps shards in CPU memory (GPUs).")
    disable_tqdm: bool = opt(False, "Hide the progress bar.")


@dataclass
class GenerationArgs:
    """Decoding settings shared by predict, chat and serve."""

    predict_with_generate: bool = opt(False, "Generate text when predicting (sft only).")
    max_new_tokens: int = opt(512, "Most tokens generated per answer.")
    do_sample: bool = opt(False, "Sample instead of greedy decoding (greedy keeps predictions repeatable).")
    temperature: float = opt(0.95, "Sampling temperature.")
    top_p: float = opt(0.7, "Nucleus sampling probability mass.")
    top_k: int = opt(50, "Sample among the k most likely tokens.")
    num_beams: int = opt(1, "Beam search width (1 = no beam search).")
    repetition_penalty: float = opt(1.0, "Penalty for repeated tokens (1 = none).")


@dataclass
class EvalArgs:
    """Multiple-choice benchmarks (`tunesmith eval`)."""

    task: str | None = opt(None, "mmlu, ceval, cmmlu, a task folder under task_dir, or `<task>_<split>`.")
    task_dir: str = opt("evaluation", "Folder holding the task folders.")
    split: str = opt("validation", "Split to score: validation (alias val), test or dev.")
    lang: Literal["en", "zh"] = opt("en", "Prompt wording.")
    n_shot: int = opt(5, "Solved examples from the dev split placed before each question.")
    batch_size: int = opt(4, "Questions per forward pass.")
    save_dir: str | None = opt(None, "Where results.json, results.log and per-question lines go.")
    subjects: str | None = opt(None, "Only these subjects (comma separated file names without split suffix).")
    prefix_reuse: bool = opt(True, "Run each subject's shared few-shot prefix once and reuse its KV cache.")


@dataclass
class ExportArgs:
    """Merging and writing a standalone model (`tunesmith export`)."""

    export_dir: str | None = opt(None, "Folder the exported model is written to.")
    export_size: float = opt(5.0, "Largest shard in GB (decimal, 1 GB = 10^9 bytes).")
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of the exported weights; `auto` keeps the base model's."
    )
    export_legacy_format: bool = opt(False, "Write pytorch_model*.bin (pickle) instead of safetensors.")
    export_format: Literal["safetensors", "gguf"] = opt(
        "safetensors", "`gguf`: one .gguf file for llama.cpp, Ollama and LM Studio (llama.cpp's own converter), "
        "with an Ollama Modelfile.")
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = opt(
        "f16", "GGUF weight type: f32, f16, bf16, or q8_0 (8-bit); k-quants need llama.cpp's llama-quantize.")
    llama_cpp_source: str | None = opt(None, "GGUF: a llama.cpp checkout whose converter to use (default: the "
                                       "pinned llama-cpp-python source distribution's, fetched once with pip).")
    export_device: Literal["cpu", "auto"] = opt("cpu", "Device used for merging.")


@dataclass
class ServeArgs:
    """The OpenAI-compatible server (`tunesmith serve`)."""

    host: str = opt("127.0.0.1", "Address to listen on.")
    port: int = opt(8000, "Port to listen on.")
    api_key: str | None = opt(None, "Bearer token clients must send (the API_KEY environment variable also works).")
    api_model_name: str | None = opt(None, "Model name reported by /v1/models.")
    max_request_bytes: int = opt(4 * 2**20, "Largest request body accepted; larger ones get a 413.")
    queue_timeout: float = opt(
        300.0, "Seconds a request may wait for the model behind others before it gets a 503 (0 = wait forever).")


@dataclass
class LoggingArgs:
    """What every command prints."""

    log_level: Literal["warning", "info", "debug"] = opt(
        "info", "Messages shown: `info` (default: resume points, data counts, trainable parameters, speed-ups in "
        "use), `warning` (quieter: problems only) or `debug` (also the libraries' own messages).")


GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "finetuning": FinetuningArgs,
    "training": TrainingArgs,
    "generation": GenerationArgs,
    "eval": EvalArgs,
    "export": ExportArgs,
    "serve": ServeArgs,
    "logging": LoggingArgs,
}


@dataclass
class Config:
    """The whole config; `cfg.training.learning_rate` etc."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    finetuning: FinetuningArgs = field(default_factory=FinetuningArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    export: ExportArgs = field(default_factory=ExportArgs)
    serve: ServeArgs = field(default_factory=ServeArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)

    def adapter_paths(self) -> list[str]:
        """`adapter_name_or_path` as a list, in the order the adapters apply."""
        return [p.strip() for p in (self.model.adapter_name_or_path or "").split(",") if p.strip()]

    def to_flat_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name in GROUPS:
            flat.update(vars(getattr(self, name)))
        return flat


# Old or alternative spellings that mean exactly the same key.
ALIASES: dict[str, str] = {
    "evaluation_strategy": "eval_strategy",
    "checkpoint_dir": "adapter_name_or_path",
    "neat_packing": "packing",
    "tokenized_path": "data_cache_dir",
    "eval_batch_size": "batch_size",
    "flash_attn": "attn_implementation",
    "max_completion_length": "max_new_tokens",
}

# Values of aliased keys that are spelled differently in LLaMA-Factory.
ALIAS_VALUES: dict[str, dict[Any, Any]] = {
    "flash_attn": {"auto": "auto", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"},
}

# LLaMA-Factory keys that tunesmith does not implement yet: a clear error, never silence.
NOT_SUPPORTED: dict[str, str] = {
    "rope_scaling": "RoPE scaling overrides are not supported yet",
    "shift_attn": "shift short attention is not supported",
    "use_unsloth": "unsloth kernels are not supported",
    "streaming": "streaming datasets are not supported yet",
    "use_galore": "GaLore is not supported",
    "use_badam": "BAdam is not supported",
    "use_apollo": "APOLLO is not supported",
    "use_llama_pro": "LLaMA Pro is not supported",
    "pissa_init": "PiSSA initialisation is not supported yet",
    "loraplus_lr_ratio": "LoRA+ is not supported yet",
    "export_quantization_bit": "quantized export is not supported yet",
    "export_hub_model_id": "pushing to a hub is not supported (offline tool)",
    "push_to_hub": "pushing to a hub is not supported (offline tool)",
    "image_max_pixels": "multimodal models are not supported yet",
    "video_max_pixels": "multimodal models are not supported yet",
    "freeze_vision_tower": "multimodal models are not supported yet",
    "resize_vocab": "vocabulary resizing is not supported yet",
    "new_special_tokens": "adding special tokens is not supported yet",
}

# Key families of LLaMA-Factory that tunesmith does not implement, by prefix (fp8_backend, ray_num_workers, ...).
NOT_SUPPORTED_PREFIXES: dict[str, str] = {
    "fp8": "FP8 training is not supported (bf16 or fp32 on CPUs, bf16/fp16 on GPUs)",
    "ray": "launching through Ray is not supported; use torchrun (see docs/distributed.md)",
    "profil": "the training profiler is not supported",
}
for _ray_key in ("resources_per_worker", "placement_strategy"):
    NOT_SUPPORTED[_ray_key] = NOT_SUPPORTED_PREFIXES["ray"]

# Keys LLaMA-Factory (or transformers' TrainingArguments) accept that have no effect here: accepted, and named
# in the log, because they describe the environment rather than the job.
IGNORED: set[str] = {"ddp_find_unused_parameters", "save_only_model", "dataloader_pin_memory", "logging_first_step",
                     "remove_unused_columns", "include_num_input_tokens_seen", "use_fast_tokenizer", "print_param_status",
                     "use_cpu", "tf32", "save_safetensors", "eval_accumulation_steps", "low_cpu_mem_usage"}

# LLaMA-Factory switches whose meaning is the negation of a tunesmith key.
INVERTED: dict[str, str] = {"disable_gradient_checkpointing": "gradient_checkpointing"}
