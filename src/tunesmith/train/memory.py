"""Training memory: activations that are cheap to recompute are not kept for the backward (on every device).

Gated MLPs (Llama, Qwen, Mistral, ...) compute `silu(gate) * up`: autograd keeps `gate` for SiLU's backward and
also `silu(gate)` for the product's backward, one of the largest tensors of a layer. With these saved-tensor
hooks (PyTorch's documented mechanism for this) the product keeps a reference to `gate` instead and recomputes
`silu(gate)` when the backward needs it: a single elementwise op per layer, no change to the model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


_SILU = "recompute-silu"


def _pack(tensor: torch.Tensor) -> Any:
    node = tensor.grad_fn
    if node is not None and type(node).__name__ == "SiluBackward0":
        return (_SILU, node._saved_self)  # the SiLU input, which its own backward keeps anyway
    return tensor


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, tuple) and packed[0] == _SILU:
        return F.silu(packed[1])
    return packed


def recompute_cheap_activations() -> Any:
    """A context for the forward pass of training."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
