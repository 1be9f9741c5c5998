"""Attention for packed rows: one causal attention per sample, never across samples, no mask.

A packed row holds several samples. SDPA with a block-diagonal mask computes the whole T x T score matrix,
masked blocks included; attending causally within each sample computes only what is needed. The kernel is
chosen once at setup (train/kernels.py) and registered through transformers' AttentionInterface:

- `cpu`: a blocked implementation with a written-out backward (`BlockedCausalAttention`) while the attention
  probabilities stay small, SDPA for longer samples; half-precision samples padded to a multiple of 64 tokens;
- `sdpa`: PyTorch's fused causal SDPA per sample (GPUs without a varlen kernel);
- `varlen`: PyTorch's varlen attention (`torch.nn.attention.varlen`, FlashAttention inside, CUDA), the whole row
  in one call with the sample boundaries as a device tensor built once per batch;
- `flash_varlen`: FlashAttention's own varlen kernel where the `flash_attn` package is installed.

The sample bounds reach every layer through the model's kwargs (`BOUNDS_KWARG`); without them a row is one sample.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

BOUNDS_KWARG = "tunesmith_seq_bounds"
KERNELS = ("cpu", "sdpa", "varlen", "flash_varlen")


def _bounds(query: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> list[int]:
    bounds = kwargs.get(BOUNDS_KWARG)
    if bounds is None:  # one unpadded sequence per row: plain causal attention
        if attention_mask is not None:
            raise ValueError("tunesmith's packed attention takes packed rows with sample bounds, not padding masks")
        bounds = [0, query.shape[2]]
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"sample bounds {bounds[0]}..{bounds[-1]} do not cover the row of {query.shape[2]} tokens")
    return bounds


def per_sample_attention(sample: Callable[..., torch.Tensor], module: Any, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                         scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """q/k/v (1, heads, T, dim) split once per tensor into samples, `sample` attention on each."""
    bounds = _bounds(query, attention_mask, kwargs)
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    gqa = key.shape[1] != query.shape[1]
    # One split per tensor: its backward writes every sample's gradient into one buffer, where a slice per sample
    # would make autograd add a full-size zero-filled gradient for each.
    pieces = [sample(q, k, v, dropout, scaling, gqa)
              for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scaling: float | None,
                gqa: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa)


class _CuSeqlens:
    """The batch's sample boundaries as an int32 device tensor, built by the first layer and reused by the
    others (the bounds list is the same object for every layer of one forward)."""

    def __init__(self) -> None:
        self.bounds: list[int] | None = None
        self.tensor: torch.Tensor | None = None

    def __call__(self, bounds: list[int], device: torch.device) -> torch.Tensor:
        if self.bounds is not bounds or self.tensor is None or self.tensor.device != device:
            self.bounds, self.tensor = bounds, torch.tensor(bounds, dtype=torch.int32, device=device)
        return self.tensor


_cu_seqlens = _CuSeqlens()


def varlen_attention(varlen: Callable[..., torch.Tensor], module: Any, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The whole row in one varlen call: q/k/v (1, heads, T, dim) -> (T, heads, dim)."""
    if dropout > 0:
        raise ValueError("the varlen attention kernel takes no attention dropout; set `attn_implementation: sdpa`")
    bounds = _bounds(query, attention_mask, kwargs)
    cu = _cu_seqlens(bounds, query.device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    return varlen(q, k, v, cu, longest, scaling, key.shape[1] != query.shape[1])[None], None


def _torch_varlen(q, k, v, cu, longest, scaling, gqa):  # type: ignore[no-untyped-def]
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0), enable_gqa=gqa)


def _flash_varlen(q, k, v, cu, longest, scaling, gqa):  # type: ignore[no-untyped-def]
    from flash_attn import flash_attn_varlen_func  # grouped-query heads are native to it

    return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scaling, causal=True)


# bf16/fp16 CPU kernels keep compiled code per shape, which adds up over hundreds of sample lengths; samples are
# zero-padded at the end to a multiple of this, which causal attention never lets real tokens see.
HALF_PRECISION_BUCKET = 64

# On the CPU, causal attention over blocks of queries (BlockedCausalAttention) beats PyTorch's fused kernel for
# short and medium samples (benchmarks/LOG.md). It keeps the attention probabilities (heads x length^2 / 2 values)
# for the backward, so it is used while those stay small next to the rest of a layer's activations; longer
# samples use the fused kernel.
BLOCKED_MAX_PROBS = {torch.bfloat16: 8 * 1024**2, torch.float16: 8 * 1024**2, torch.float32: 8 * 512**2}
QUERY_BLOCK = 128


def cpu_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scaling: float | None,
               gqa: bool) -> torch.Tensor:
    """Causal attention of one sample on the CPU, q/k/v shaped (batch, heads, length, head_dim)."""
    length = q.shape[2]
    pad = -length % HALF_PRECISION_BUCKET if q.dtype != torch.float32 else 0
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        return cpu_causal(q, k, v, dropout, scaling, gqa)[:, :, :length]
    if dropout > 0 or q.shape[1] * length**2 > BLOCKED_MAX_PROBS.get(q.dtype, 0):
        return sdpa_causal(q, k, v, dropout, scaling, gqa)
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    batch, heads, _, dim = q.shape
    q3, k3, v3 = (t.reshape(batch * heads, length, dim) for t in (q, k, v))
    scale = scaling if scaling is not None else dim**-0.5
    return BlockedCausalAttention.apply(q3, k3, v3, scale).view(batch, heads, length, dim)


_CAUSAL_BIAS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _causal_bias(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask (0 on and below the diagonal, -inf above). The top-left L x L corner of a larger one is
    the mask of length L, so one matrix per dtype, grown to the longest sample, serves every length."""
    bias = _CAUSAL_BIAS.get((dtype, device))
    if bias is None or bias.shape[0] < length:
        size = -(-length // 256) * 256
        bias = torch.full((size, size), float("-inf"), dtype=dtype, device=device).triu(1)
        _CAUSAL_BIAS[(dtype, device)] = bias
    return bias


class BlockedCausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale + causal mask) v on (batch*heads, length, dim) tensors, QUERY_BLOCK queries at a time:
    each block scores only the keys up to its own end, so about half of the masked square is never computed, and
    a block's scores stay in cache. The probabilities are kept in the input dtype for the backward (the same rounding
    as eager attention's `softmax(dtype=float32).to(dtype)`, bit for bit), whose gradient
    formulas are the standard ones: dV = P^T dO, dS = P * (dO V^T - rowsum), dQ = dS K, dK = dS^T Q."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        length = q.shape[1]
        bias = _causal_bias(length, q.dtype, q.device)
        outputs, probs = [], []
        for start in range(0, length, QUERY_BLOCK):
            end = min(start + QUERY_BLOCK, length)
            scores = torch.baddbmm(bias[start:end, :end], q[:, start:end], k[:, :end].transpose(1, 2), alpha=scale)
            p = scores.softmax(-1)  # the CPU kernel accumulates bf16/fp16 in fp32 and rounds once
            probs.append(p)
            outputs.append(p @ v[:, :end])
        ctx.save_for_backward(q, k, v, *probs)
        ctx.scale = scale
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, *probs = ctx.saved_tensors
        # keys of the first layer under LoRA on q/v need no gradient: skip that product
        need_k = ctx.needs_input_grad[1]
        grad_q = torch.empty_like(q)
        # sums over blocks: accumulate in fp32
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if need_k else None
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for block, p in enumerate(probs):
            start, end = block * QUERY_BLOCK, block * QUERY_BLOCK + p.shape[1]
            g = grad_out[:, start:end]
            grad_v[:, :end] += p.transpose(1, 2) @ g
            grad_scores = torch._softmax_backward_data(g @ v[:, :end].transpose(1, 2), p, -1, p.dtype)
            grad_q[:, start:end] = (grad_scores @ k[:, :end]) * ctx.scale
            if grad_k is not None:
                grad_k[:, :end] += grad_scores.transpose(1, 2) @ q[:, start:end]
        return grad_q, None if grad_k is None else (grad_k * ctx.scale).to(k.dtype), grad_v.to(v.dtype), None


def no_mask(*args: Any, **kwargs: Any) -> None:
    """Sample bounds replace the mask: building a T x T block-diagonal mask for a long row costs large temporary
    index tensors, for nothing."""
    return None


def attention_function(kernel: str) -> Callable[..., tuple[torch.Tensor, None]]:
    if kernel == "cpu":
        return functools.partial(per_sample_attention, cpu_causal)
    if kernel == "sdpa":
        return functools.partial(per_sample_attention, sdpa_causal)
    if kernel == "varlen":
        return functools.partial(varlen_attention, _torch_varlen)
    if kernel == "flash_varlen":
        return functools.partial(varlen_attention, _flash_varlen)
    raise ValueError(f"unknown attention kernel `{kernel}` (one of {', '.join(KERNELS)})")


def register(kernel: str | None = None) -> str:
    """Register `kernel` (default: `cpu` without CUDA, else `sdpa`) with transformers; returns the name to set as
    the model's attention implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    kernel = kernel or ("sdpa" if torch.cuda.is_available() else "cpu")
    name = f"tunesmith_{kernel}"
    AttentionInterface.register(name, attention_function(kernel))
    AttentionMaskInterface.register(name, no_mask)
    return name
