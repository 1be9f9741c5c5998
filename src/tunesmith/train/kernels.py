"""The kernels of a training run, chosen once at setup, checked on the loaded model and named in the log:

- attention for packed rows (model/attention.py): `cpu`, `sdpa`, `varlen` (PyTorch's, CUDA) or `flash_varlen`
  (the flash_attn package), or transformers' own `flash_attention_2`/`eager`; padded batches where a start-up
  check finds that the model's attention mixes packed samples;
- head + loss: `chunked` (train/head_loss.py: the logits never exist whole), Liger's fused linear cross-entropy
  (`enable_liger_kernel`, CUDA) or the model's `plain` head; Liger's norm/MLP/RoPE kernels with it;
- the last decoder layer at supervised rows only (model/kept_rows.py) where the loop allows it.

The model code and the loop call one function each; nothing else looks at the device to pick a kernel.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tunesmith.config import Config

log = logging.getLogger("tunesmith.train")


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


def varlen_kernel_works(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    """A varlen kernel against per-sample SDPA on random packed q/k/v (two samples, grouped-query heads), forward
    and backward, in the compute dtype; any failure (no kernel for this GPU or dtype) means no."""
    from tunesmith.model.attention import BOUNDS_KWARG, attention_function

    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 4, 40, 64, device=device, dtype=dtype, generator=gen, requires_grad=True)
    kv = [torch.randn(1, 2, 40, 64, device=device, dtype=dtype, generator=gen, requires_grad=True) for _ in range(2)]
    bounds = [0, 24, 40]
    try:
        got = attention_function(kernel)(None, q, *kv, None, **{BOUNDS_KWARG: bounds})[0]
        got.float().square().sum().backward()
        grad = q.grad.clone()
        q.grad = None
        want = attention_function("sdpa")(None, q, *kv, None, **{BOUNDS_KWARG: bounds})[0]
        want.float().square().sum().backward()
    except Exception as err:  # noqa: BLE001 - any failure means: use another kernel
        log.debug("attention kernel %s unavailable: %s", kernel, err)
        return False
    close = lambda a, b: float((a.float() - b.float()).abs().max()) < 2e-2 * float(b.float().abs().max())  # noqa: E731
    return close(got, want) and close(grad, q.grad)


def attention_kernel(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cuda":
        return "cpu"
    for kernel in ("varlen", "flash_varlen"):
        if varlen_kernel_works(kernel, device, dtype):
            return kernel
    return "sdpa"


def choose_attention(model: Any, cfg: Config, device: torch.device, dtype: torch.dtype) -> str | None:
    """Registers and sets the attention for packed rows; returns its name, or None for padded batches."""
    from tunesmith.model.attention import register

    wanted = cfg.model.attn_implementation
    if wanted == "flash_attention_2":
        return wanted  # transformers' varlen FlashAttention reads the packed position ids itself
    if not (zero3_sharded() or padding_free_works(model, model.config.vocab_size)):
        return None
    if wanted == "eager":
        return wanted
    kernel = attention_kernel(torch.device(device), dtype)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(register(kernel))
    return kernel


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


def use_chunked_head(model: Any, cfg: Config, accelerator: Any) -> str:
    """Head + loss in chunks of positions where the loop allows it: not under ZeRO-3 (it gathers the head only
    inside its own forward) or torch.compile. Returns the head + loss kernel's name."""
    from tunesmith.train import head_loss

    if zero3_sharded() or cfg.training.torch_compile:
        return "plain"
    kernel = "liger" if cfg.model.enable_liger_kernel else "chunked"
    with accelerator.autocast():  # as the loop runs it (adapter inputs stay in half precision from here on)
        installed = head_loss.install(model, lambda m: chunked_head_matches(m, m.config.vocab_size), kernel)
    return {"chunked": "chunked", "liger": "liger fused linear cross-entropy"}[kernel] if installed else "plain"


def use_liger_layers(model: Any, cfg: Config) -> str | None:
    """Liger's RMSNorm, SwiGLU and RoPE in place of the model's own (`enable_liger_kernel`; its fused linear
    cross-entropy is the head + loss above). Liger replaces the forward of this model's modules and its modeling
    module's RoPE function: its documented way of applying itself to a model instance."""
    if not cfg.model.enable_liger_kernel:
        return None
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return "liger (RMSNorm, SwiGLU, RoPE where Liger supports " + str(base.config.model_type) + ")"


def use_kept_rows(model: Any, cfg: Config, accelerator: Any) -> bool:
    """The last layer's MLP only at supervised positions, where the loop allows it: not with gradient
    checkpointing, compilation, FSDP or DeepSpeed, which wrap or shard layers by their class."""
    from accelerate.utils import DistributedType

    from tunesmith.model import kept_rows

    sharded = accelerator.distributed_type == DistributedType.DEEPSPEED or cfg.training.fsdp != "no"
    if sharded or cfg.training.gradient_checkpointing or cfg.training.torch_compile:
        return False
    with accelerator.autocast():
        return kept_rows.install(model, model.config.vocab_size)
