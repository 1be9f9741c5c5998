"""Padding-free attention for training on the CPU (and GPUs without FlashAttention).

A packed row holds several samples. SDPA with a block-diagonal mask computes the whole T x T score matrix,
masked blocks included; running SDPA causally on each sample's slice computes only what is needed and lets
PyTorch use its fused kernels (about 3x faster on a 2-core CPU for 4 samples per row). Registered through
transformers' AttentionInterface; without sample bounds it is plain SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

VARLEN = "tunesmith_varlen"
BOUNDS_KWARG = "tunesmith_seq_bounds"


def varlen_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    bounds = kwargs.get(BOUNDS_KWARG)
    gqa = key.shape[1] != query.shape[1]
    if bounds is None:  # one unpadded sequence per row: plain causal attention
        if attention_mask is not None:
            raise ValueError(f"`{VARLEN}` attention takes packed rows with sample bounds, not padding masks")
        bounds = [0, query.shape[2]]
    pieces = [causal_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout, scaling, gqa)
              for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


# Below this many tokens, plain matmul + softmax beats PyTorch's fused CPU kernel in bf16/fp16 (forward plus
# backward, 4 heads of 64: 0.8 vs 1.5 ms at 128 tokens, 5.4 vs 7.3 ms at 512; at 1024 the fused kernel wins).
SHORT_HALF_PRECISION = 512


# bf16/fp16 CPU kernels keep compiled code per shape (about 2 MB each, measured: 2 GB after 300 lengths); samples
# are zero-padded at the end to a multiple of this, which causal attention never lets real tokens see.
HALF_PRECISION_BUCKET = 64


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scaling: float | None,
                     gqa: bool) -> torch.Tensor:
    length = q.shape[2]
    half_on_cpu = q.device.type == "cpu" and q.dtype != torch.float32
    pad = -length % HALF_PRECISION_BUCKET if half_on_cpu else 0
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        return causal_attention(q, k, v, dropout, scaling, gqa)[:, :, :length]
    if not half_on_cpu or length > SHORT_HALF_PRECISION or dropout > 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling,
                                              enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1).to(q.dtype)
    return probs @ v


def no_mask(*args: Any, **kwargs: Any) -> None:
    """Sample bounds replace the mask: building a T x T block-diagonal mask for a 4k-token row costs hundreds of
    MB of temporary index tensors (measured), for nothing."""
    return None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_sdpa)
    AttentionMaskInterface.register(VARLEN, no_mask)
    return VARLEN
