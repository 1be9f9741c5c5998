"""The memory a training job will need, estimated from config.json before anything loads, and the `auto` values
of `gradient_checkpointing` and `max_tokens_per_forward` chosen so that it fits the device.

The estimate is the peak of the tensors the job holds (what `torch.cuda.max_memory_allocated` reports on a GPU):

    weights + trained parameters' fp32 copies, gradients and AdamW states + activations of the largest pass
    + the loss + one layer's backward

- weights: every parameter in its stored dtype (bf16 for a LoRA base under bf16, fp32 otherwise; QLoRA keeps
  the decoder's linear layers in 4 or 8 bits and everything else in fp32, as peft's k-bit preparation does);
  full and freeze tuning under autocast also hold a half-precision copy of the weights autocast casts;
- per trained parameter: fp32 value (LoRA; full/freeze count it as weights), gradient and two AdamW states;
  ZeRO-1/2 divide the states (and gradients) by the number of processes, ZeRO-3 and FSDP the weights too;
- activations per token and layer: `ACTIVATION_BYTES` coefficients x (hidden, intermediate, key/value width),
  counted from the tensors autograd saves in a Llama-shaped layer (benchmarks/memory_estimate.py prints how the
  total compares with what a run measured); with checkpointing only each layer's input is kept, and the layer
  being recomputed adds one layer's activations;
- the loss: the chunked head keeps its input and the gradient it forms ahead (positions x hidden) and one chunk
  of logits with its softmax; the plain head the whole [positions x vocabulary] logits three times.

`plan_memory` runs first thing in training setup; explicit values win, and a job that cannot fit at the smallest
setting (checkpointing on, one sample per pass) is refused with what would make it fit.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith import stages
from tunesmith.config import Config
from tunesmith.config.loader import ConfigError

log = logging.getLogger("tunesmith.train")

GIB = 1 << 30
# bytes per token per decoder layer: (hidden, intermediate, key/value width) coefficients, by what trains and the
# compute precision; the gated MLP's SiLU output is recomputed (train/memory.py)
ACTIVATION_BYTES = {
    ("full", 4): (36.0, 12.0, 8.4), ("lora", 4): (24.0, 12.0, 8.8),
    ("full", 2): (34.0, 6.0, 4.4), ("lora", 2): (24.5, 6.2, 4.5),
}
CHECKPOINTED_BYTES = {("full", 4): 8.0, ("lora", 4): 6.0, ("full", 2): 8.0, ("lora", 2): 4.0}  # x hidden
USABLE_SHARE = 0.9  # of the device's free memory: allocator fragmentation and what the estimate leaves out
CPU_PROCESS_BYTES = 1 * GIB  # libraries, Python and the data pipeline beside the tensors on a CPU


@dataclass
class Shape:
    """The dimensions of a decoder-only transformer that its memory depends on."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 1  # MoE: experts per layer, and experts each token runs through
    experts_per_token: int = 1

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by Llama's module names."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_width, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        mlp = {"gate_proj", "up_proj", "down_proj"}
        return sum(a * b * (self.experts if name in mlp else 1) for name, (a, b) in self.linear_shapes().items())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        return self.layers * (self.layer_linear_params() + 2 * self.hidden) + self.embedding_params() + self.hidden


def model_shape(model_path: str) -> Shape | None:
    """The shape from the model's config.json (a local folder or the hub cache); None when it is not a
    decoder-only transformer this estimate knows (the job then runs with the non-auto defaults)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - the loader reports a missing model properly later
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    get = lambda *names, default=None: next(  # noqa: E731
        (getattr(text, n) for n in names if getattr(text, n, None) is not None), default)
    hidden, layers, vocab = get("hidden_size"), get("num_hidden_layers"), get("vocab_size")
    heads = get("num_attention_heads")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, vocab, heads)):
        return None
    experts = get("num_local_experts", "num_experts", "n_routed_experts", default=1) or 1
    intermediate = get("moe_intermediate_size", default=None) if experts > 1 else None
    return Shape(hidden=hidden, layers=layers, intermediate=intermediate or get("intermediate_size", default=4 * hidden),
                 heads=heads, kv_heads=get("num_key_value_heads", default=heads),
                 head_dim=get("head_dim", default=hidden // heads), vocab=vocab,
                 tied=bool(getattr(config, "tie_word_embeddings", False)), experts=experts,
                 experts_per_token=get("num_experts_per_tok", "moe_topk", default=1) if experts > 1 else 1)


@dataclass
class Estimate:
    """Bytes of each part of a job's peak, for one setting of checkpointing and tokens per pass."""

    weights: float
    trained: float  # fp32 values (LoRA), gradients and optimizer states
    activations: float
    in_flight: float  # the loss and the backward of one layer
    checkpointing: bool
    tokens: int

    @property
    def total(self) -> float:
        return self.weights + self.trained + self.activations + self.in_flight

    def describe(self) -> str:
        gb = lambda b: f"{b / GIB:.1f}"  # noqa: E731
        return (f"{gb(self.total)} GiB = weights {gb(self.weights)} + trained parameters' states {gb(self.trained)} "
                f"+ activations {gb(self.activations)} + loss and backward {gb(self.in_flight)} "
                f"({self.tokens:,} tokens per pass, gradient checkpointing {'on' if self.checkpointing else 'off'})")


def _lora_params(shape: Shape, cfg: Config) -> int:
    f = cfg.finetuning
    names = shape.linear_shapes()
    wanted = names.keys() if f.lora_target.strip() == "all" else \
        {n.strip() for n in f.lora_target.split(",")} & names.keys() or names.keys()
    per_layer = sum(f.lora_rank * (names[n][0] + names[n][1]) for n in wanted)
    return shape.layers * per_layer


def _trained_layers(shape: Shape, cfg: Config) -> int:
    n = cfg.finetuning.freeze_trainable_layers
    return min(shape.layers, abs(n)) if n else 0


def trained_params(shape: Shape, cfg: Config) -> int:
    kind = cfg.finetuning.finetuning_type
    if kind == "full":
        return shape.params()
    if kind == "freeze":
        return _trained_layers(shape, cfg) * (shape.layer_linear_params() + 2 * shape.hidden)
    extra = shape.embedding_params() if cfg.finetuning.additional_target else 0
    return _lora_params(shape, cfg) + extra


def _deepspeed_zero(cfg: Config) -> dict:
    if not cfg.training.deepspeed:
        return {}
    try:
        zero = json.loads(Path(cfg.training.deepspeed).read_text(encoding="utf-8")).get("zero_optimization", {})
        return zero if isinstance(zero, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def zero_stage(cfg: Config) -> int:
    """The ZeRO stage of the run: DeepSpeed's from its config; for FSDP 3 (2 with shard_grad_op, whose weights
    stay gathered from the forward to the backward); else 0."""
    if cfg.training.fsdp != "no" or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return 2 if cfg.training.fsdp == "shard_grad_op" else 3
    try:
        return int(_deepspeed_zero(cfg).get("stage", 0))
    except (TypeError, ValueError):
        return 0


def _offloaded(zero: dict, key: str) -> bool:
    part = zero.get(key)
    return isinstance(part, dict) and part.get("device") in ("cpu", "nvme")


def _sharding(cfg: Config, world: int) -> tuple[float, float, float]:
    """Divisors of (weights, gradients, optimizer states) per process on the device (inf: offloaded to the
    CPU by DeepSpeed)."""
    stage = zero_stage(cfg)
    shards = world if world > 1 else 1
    weights, grads, states = (shards if stage >= 3 else 1, shards if stage >= 2 else 1, shards if stage >= 1 else 1)
    zero = _deepspeed_zero(cfg)
    if _offloaded(zero, "offload_optimizer"):  # the fp32 states and gradients live and step on the CPU
        grads = states = math.inf
    if stage >= 3 and _offloaded(zero, "offload_param"):
        weights = math.inf
    return weights, grads, states


def weight_bytes(shape: Shape, cfg: Config) -> float:
    t, kind, bits = cfg.training, cfg.finetuning.finetuning_type, cfg.model.quantization_bit
    half = t.bf16 or t.fp16
    linear = shape.layers * shape.layer_linear_params()
    other = shape.params() - linear
    if bits:  # k-bit preparation keeps embeddings, head and norms in fp32; 4-bit blocks of 64 with a scale each
        per = {4: 0.5 + (0.5 / 64 if cfg.model.double_quantization else 4 / 64), 8: 1.0 + 4 / 64}.get(bits, 1.0)
        return linear * per + other * 4
    stored = 2 if (kind == "lora" and t.bf16) else 4
    copies = 2 * linear if (half and stored == 4) else 0  # autocast's half-precision copies of fp32 weights
    return shape.params() * stored + copies


def estimate(shape: Shape, cfg: Config, tokens: int, checkpointing: bool, world: int = 1,
             several_passes: bool = False) -> Estimate:
    """The peak bytes per process of training `shape` with `tokens` tokens in each forward/backward pass
    (`several_passes`: a step runs more than one)."""
    t, f = cfg.training, cfg.finetuning
    half = t.bf16 or t.fp16
    compute = 2 if half or cfg.model.quantization_bit else 4
    w_div, g_div, s_div = _sharding(cfg, world)
    trained = trained_params(shape, cfg)
    own_copy = 4 if f.finetuning_type == "lora" else 0  # full/freeze: the fp32 value is counted as a weight
    states = trained * (own_copy / w_div + 8 / s_div)
    grads = trained * 4 / g_div
    # gradients exist during a pass only once an earlier pass of the step has left them; the optimizer step
    # holds them with one temporary of the same size (AdamW's foreach square root)
    grads_in_pass = cfg.training.gradient_accumulation_steps > 1 or several_passes
    weights = weight_bytes(shape, cfg) / w_div
    if t.fsdp != "no" and w_div > 1:  # the outermost group whole through the step, one decoder layer gathered
        linear = shape.layers * shape.layer_linear_params()
        whole = (shape.params() - linear) + linear / shape.layers
        weights += weight_bytes(shape, cfg) * whole / shape.params() * (1 - 1 / w_div)
    if stages.get(f.stage).keeps_reference(cfg):
        weights += weight_bytes(shape, cfg) / w_div  # the frozen reference copy
    kind = "lora" if f.finetuning_type == "lora" else "full"
    a_h, a_i, a_kv = ACTIVATION_BYTES[(kind, compute)]
    per_layer = tokens * (a_h * shape.hidden + a_i * shape.intermediate * shape.experts_per_token
                          + a_kv * shape.kv_width)
    saving_layers = shape.layers
    if f.finetuning_type == "freeze" and f.freeze_trainable_layers > 0:
        saving_layers = _trained_layers(shape, cfg)  # frozen layers below the trained ones keep nothing
    if checkpointing:
        activations = tokens * CHECKPOINTED_BYTES[(kind, compute)] * shape.hidden * saving_layers
        backward = 2 * per_layer  # the layer recomputed, and its backward
    else:
        activations = per_layer * saving_layers
        backward = per_layer
    kept, logits = _loss_bytes(shape, cfg, tokens, compute)
    # the loss's logits exist at the end of the forward, a layer's backward after them: the larger one counts
    transient = max(logits, backward)
    if grads_in_pass:
        return Estimate(weights, states + grads, activations, kept + transient, checkpointing, tokens)
    step = 2 * grads  # the optimizer step: gradients and AdamW's temporary, after the activations are gone
    if step > activations + kept + transient:
        return Estimate(weights, states + step, 0.0, 0.0, checkpointing, tokens)
    return Estimate(weights, states, activations, kept + transient, checkpointing, tokens)


def _loss_bytes(shape: Shape, cfg: Config, tokens: int, compute: int) -> tuple[float, float]:
    """(bytes the loss keeps through the backward, bytes of logits it holds for a moment)."""
    from tunesmith.train.head_loss import chunk_for

    head_grad = shape.vocab * shape.hidden * 4 if cfg.finetuning.finetuning_type == "full" else 0
    zero3 = zero_stage(cfg) == 3 and cfg.training.fsdp == "no"  # DeepSpeed ZeRO-3 (FSDP chunks the head too)
    if not zero3 and not cfg.training.torch_compile:  # where kernels.use_chunked_head chunks
        chunk = min(tokens, chunk_for(shape.vocab))
        # the head's input and the gradient formed ahead; a chunk's fp32 logits and log-sum-exp's temporary
        # (+ the half-precision logits and a cast under autocast)
        return tokens * shape.hidden * compute * 3 + head_grad, chunk * shape.vocab * (8 if compute == 4 else 12)
    return tokens * shape.hidden * compute * 2 + head_grad, tokens * shape.vocab * (compute + 8)


def capacity() -> tuple[float, str]:
    """Bytes this process may use for tensors, and the device in words."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return free * USABLE_SHARE, f"{torch.cuda.get_device_name()} ({free / GIB:.1f} of {total / GIB:.1f} GiB free)"
    available = _mem_available()
    return max(0.0, (available - CPU_PROCESS_BYTES) * USABLE_SHARE), f"CPU memory ({available / GIB:.1f} GiB available)"


def _mem_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _pass_tokens(cfg: Config, rows_per_sample: int) -> int:
    """Tokens of the largest pass one micro-batch makes when passes are not bounded."""
    return cfg.training.per_device_train_batch_size * cfg.data.cutoff_len * rows_per_sample


def plan_memory(cfg: Config, world: int, rows_per_sample: int, is_main: bool) -> Estimate | None:
    """Resolve `auto` checkpointing and tokens per pass to the fastest setting that fits (in this order: the
    whole micro-batch in one pass, shorter passes, then the same with checkpointing); explicit values win.
    Refuses a job whose smallest setting does not fit. None when the model's shape is unknown."""
    t = cfg.training
    auto_ckpt, auto_tokens = t.gradient_checkpointing == "auto", t.max_tokens_per_forward == "auto"
    shape = model_shape(cfg.model.model_name_or_path)
    if shape is None:
        t.gradient_checkpointing = False if auto_ckpt else t.gradient_checkpointing
        t.max_tokens_per_forward = 0 if auto_tokens else t.max_tokens_per_forward
        if is_main:
            log.info("memory: no estimate for this model's architecture; gradient_checkpointing %s, "
                     "max_tokens_per_forward %s", t.gradient_checkpointing, t.max_tokens_per_forward)
        return None
    room, device = capacity()
    whole = _pass_tokens(cfg, rows_per_sample)
    smallest = min(whole, cfg.data.cutoff_len * rows_per_sample)  # a pass holds at least its longest sample

    def peak(tokens: int, ckpt: bool) -> Estimate:
        return estimate(shape, cfg, tokens, ckpt, world, several_passes=tokens < whole)

    choices = []  # (checkpointing, max_tokens_per_forward) from fastest to leanest
    for ckpt in ([False, True] if auto_ckpt else [bool(t.gradient_checkpointing)]):
        if not auto_tokens:
            choices.append((ckpt, t.max_tokens_per_forward))
            continue
        tokens = _largest_fitting(lambda n: peak(n, ckpt).total <= room, smallest, whole)
        choices.append((ckpt, smallest if tokens is None else tokens if tokens < whole else 0))
    sized = [(c, n, peak(min(max(n, smallest), whole) if n else whole, c)) for c, n in choices]
    fitting = [choice for choice in sized if choice[2].total <= room]
    if not fitting and auto_ckpt and auto_tokens:
        raise ConfigError([_refusal(peak(smallest, True), cfg, room, device)])
    ckpt, bound, chosen = fitting[0] if fitting else sized[-1]
    t.gradient_checkpointing, t.max_tokens_per_forward = ckpt, bound
    if is_main:
        log.info("memory: estimated peak %s; usable %.1f GiB of %s -> gradient_checkpointing %s, "
                 "max_tokens_per_forward %s", chosen.describe(), room / GIB, device, ckpt,
                 bound or "0 (one pass per micro-batch)")
        if not fitting:
            log.warning("memory: this setting is estimated not to fit (%.1f GiB needed, %.1f usable); running it "
                        "as configured", chosen.total / GIB, room / GIB)
    return chosen


def _largest_fitting(fits: Any, low: int, high: int) -> int | None:
    """The most tokens per pass in [low, high] (multiples of 256 between) for which `fits`, or None."""
    if not fits(low):
        return None
    if fits(high):
        return high
    lo, hi = low, high  # fits(lo), not fits(hi)
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _refusal(least: Estimate, cfg: Config, room: float, device: str) -> str:
    fixes = []
    if cfg.finetuning.finetuning_type != "lora":
        fixes.append("`finetuning_type: lora`")
    if cfg.model.quantization_bit is None:
        fixes.append("`quantization_bit: 4` (QLoRA)")
    fixes += [f"a smaller `cutoff_len` (now {cfg.data.cutoff_len})", "DeepSpeed ZeRO-3 over several GPUs or with "
              "offload (`deepspeed: examples/deepspeed/ds_z3_offload_config.json`)"]
    return (f"this job is estimated to need at least {least.describe()}, more than the {room / GIB:.1f} GiB usable "
            f"of {device}. What would make it fit: " + ", ".join(fixes) + ". To run it anyway, set both "
            "`gradient_checkpointing` and `max_tokens_per_forward` explicitly (the estimate is explained in "
            "docs/training.md, memory).")
