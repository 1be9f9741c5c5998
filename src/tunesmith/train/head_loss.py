"""Output head + cross-entropy in chunks of positions: the [positions x vocabulary] logits never exist whole.

With a 151,936-token vocabulary, 10k supervised positions make 6 GB of fp32 logits, and the plain path keeps a
log-softmax and a gradient of the same size. `ChunkedTokenNLL` computes each chunk's logits, its log-sum-exp and
the target's logit, keeps nothing but its inputs, and recomputes the chunk in the backward to form
softmax - onehot, which it multiplies into the gradients of the hidden states and the head. The memory of the
loss is one chunk (`CHUNK_ELEMENTS` logits) instead of three full tensors; the head's product runs once more.

The model keeps its forward: `PassThroughHead` takes the place of the output head (same parameter names, so
state dicts and adapters do not change) and, while training, hands the hidden states through, so the model's
"logits" are hidden states and the losses call `token_nll` with the head's weight. Installed at setup after a
check on the loaded model that the chunked loss and its gradients equal the plain ones (models that post-process
their logits, e.g. with soft-capping, fail the check and keep the plain path), and not under ZeRO-3 or FSDP,
which gather the head's weight only inside its own forward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("tunesmith.train")
IGNORE = -100
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MB in fp32)


class ChunkedTokenNLL(torch.autograd.Function):
    """Per-position negative log-likelihood (0 where the target is IGNORE) and whether the argmax is the target."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        nll = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        hits = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        valid = targets != IGNORE
        safe = targets.clamp(min=0)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            logits = F.linear(hidden[start:end], weight, bias).float()
            picked = logits.gather(1, safe[start:end, None]).squeeze(1)
            nll[start:end] = (logits.logsumexp(-1) - picked) * valid[start:end]
            hits[start:end] = (logits.argmax(-1) == targets[start:end]) & valid[start:end]
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(hits)
        return nll, hits

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor, _: Any) -> tuple[Any, ...]:
        hidden, weight, bias, targets = ctx.saved_tensors
        valid = targets != IGNORE
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        # the forward's product ran in the hidden states' dtype (autocast's choice); the recomputation does too
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            rows = hidden[start:end]
            with torch.autocast(hidden.device.type, enabled=False):
                logits = F.linear(rows, w, b).float()
            grad = torch.softmax(logits, dim=-1)
            index = torch.arange(end - start, device=grad.device)
            grad[index, targets[start:end].clamp(min=0)] -= 1
            grad *= (grad_nll[start:end] * valid[start:end])[:, None]
            if grad_hidden is not None:
                grad_hidden[start:end] = grad.to(rows.dtype) @ w
            if grad_weight is not None:
                grad_weight += grad.t() @ rows.float()
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def chunk_for(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def token_nll(hidden: torch.Tensor, head: "PassThroughHead", targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [..., H] and targets [...] -> per-position NLL (fp32) and argmax hits, shaped like targets."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    nll, hits = ChunkedTokenNLL.apply(flat, head.weight, head.bias, targets.reshape(-1),
                                      chunk_for(head.weight.shape[0]))
    return nll.view(targets.shape), hits.view(targets.shape)


class PassThroughHead(nn.Module):
    """The output head's parameters under their own names; with `passing` it returns its input unchanged."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self.passing = False
        self.original = [head]  # in a list: not a child, its parameters are already ours

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.passing else F.linear(hidden, self.weight, self.bias)


def installed_head(model: Any) -> PassThroughHead | None:
    base = model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if isinstance(head, PassThroughHead) and head.passing else None


def install(model: Any, check: Any) -> bool:
    """Replace a plain nn.Linear output head by PassThroughHead when `check(model)` (which compares the chunked
    loss and gradients with the plain ones) passes; True when installed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return False
    chunked = PassThroughHead(head)
    base.set_output_embeddings(chunked)
    chunked.passing = True
    if check(model):
        return True
    base.set_output_embeddings(head)
    log.warning("the chunked head + loss did not match the plain one on this model; using the plain path")
    return False
