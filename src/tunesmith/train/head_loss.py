"""Output head + cross-entropy in chunks of positions: the [positions x vocabulary] logits never exist whole.

With a 151,936-token vocabulary, 10k supervised positions make 6 GB of fp32 logits, and the plain path keeps a
log-softmax and a gradient of the same size. `ChunkedTokenNLL` computes each chunk's logits, its log-sum-exp and
the target's logit, and, while training, softmax - onehot multiplied into the gradients of the hidden states and
the head right away (the products the backward would run), so the memory of the loss is one chunk
(`CHUNK_ELEMENTS` logits) plus those gradients instead of three full [positions x vocabulary] tensors.

The model keeps its forward: `PassThroughHead` takes the place of the output head (same parameter names, so
state dicts and adapters do not change) and, while training, hands the hidden states through, so the model's
"logits" are hidden states and the losses call `token_nll` with the head's weight. Installed at setup after a
check on the loaded model that the chunked per-position loss equals the one from the model's own logits (models
that post-process their logits, e.g. with soft-capping, fail the check and keep the plain path; the gradients
are tested in tests/test_head_loss.py), and not under ZeRO-3, which gathers the head's weight only inside its own
forward. Under FSDP the head is put in place before sharding (`place`) and switched on after the check; FSDP keeps
the model's outermost weights, the head's among them, gathered from the forward to the end of the backward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.encode import IGNORE

log = logging.getLogger("tunesmith.train")
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MB in fp32)


class ChunkedTokenNLL(torch.autograd.Function):
    """Per-position negative log-likelihood (0 where the target is IGNORE) and whether the argmax is the target.

    With `grads_ahead` the forward also forms each chunk's softmax - onehot and multiplies it into the gradients
    of the hidden states and the head at once, as if every position's upstream gradient were 1; the backward then
    only scales them, when the upstream gradient is the same at every supervised position (a summed loss, as in
    pt/sft). Otherwise (dpo weighs sequences) the backward recomputes each chunk.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, grads_ahead: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        nll = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        hits = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        valid = targets != IGNORE
        ahead = _Grads(hidden, weight, bias, ctx.needs_input_grad) if grads_ahead else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = F.linear(hidden[start:end], weight, bias).float()
            lse = logits.logsumexp(-1)
            picked = logits.gather(1, targets[start:end].clamp(min=0)[:, None]).squeeze(1)
            nll[start:end] = (lse - picked) * valid[start:end]
            hits[start:end] = (logits.argmax(-1) == targets[start:end]) & valid[start:end]
            if ahead is not None:
                ahead.add(start, end, _softmax_minus_onehot(logits.sub_(lse[:, None]).exp_(), targets[start:end],
                                                          valid[start:end]))
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.ahead = chunk, ahead
        ctx.mark_non_differentiable(hits)
        return nll, hits

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor, _: Any) -> tuple[Any, ...]:
        hidden, weight, bias, targets = ctx.saved_tensors
        valid = targets != IGNORE
        upstream = grad_nll[valid]
        if ctx.ahead is not None and (upstream.numel() == 0 or bool((upstream == upstream[0]).all())):
            scale = upstream[0] if upstream.numel() else grad_nll.new_zeros(())
            return (*ctx.ahead.scaled(scale, weight, bias), None, None, None)
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad)
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            with torch.autocast(hidden.device.type, enabled=False):
                logits = F.linear(hidden[start:end], grads.w, grads.b).float()
            grad = _softmax_minus_onehot(torch.softmax(logits, dim=-1), targets[start:end], valid[start:end])
            grads.add(start, end, grad * grad_nll[start:end, None])
        return (*grads.scaled(None, weight, bias), None, None, None)


def _softmax_minus_onehot(probs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """d NLL / d logits of each position, in place on `probs` (rows of ignored positions zeroed)."""
    probs[torch.arange(probs.shape[0], device=probs.device), targets.clamp(min=0)] -= 1
    return probs.mul_(valid[:, None])


class _Grads:
    """Gradients of the hidden states, the head's weight and bias, summed chunk by chunk."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: Any):
        # the forward's product ran in the hidden states' dtype (autocast's choice); these products do too
        self.hidden, self.w = hidden, weight.to(hidden.dtype)
        self.b = None if bias is None else bias.to(hidden.dtype)
        self.grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        self.grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
        self.grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and needs[2] else None

    def add(self, start: int, end: int, grad_logits: torch.Tensor) -> None:
        if self.grad_hidden is not None:
            self.grad_hidden[start:end] = grad_logits.to(self.w.dtype) @ self.w
        if self.grad_weight is not None:
            self.grad_weight += grad_logits.t() @ self.hidden[start:end].float()
        if self.grad_bias is not None:
            self.grad_bias += grad_logits.sum(0)

    def scaled(self, scale: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        def out(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
            if grad is None or like is None:
                return None
            return (grad if scale is None else grad * scale).to(like.dtype)
        return out(self.grad_hidden, self.hidden), out(self.grad_weight, weight), out(self.grad_bias, bias)


def chunk_for(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def token_nll(hidden: torch.Tensor, head: "PassThroughHead", targets: torch.Tensor,
              summed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [..., H] and targets [...] -> per-position NLL (fp32) and argmax hits, shaped like targets.
    `summed`: the caller sums the NLL into its loss (pt/sft), so the gradients can be formed in the forward;
    false where positions are weighed differently (dpo's per-sequence terms)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    if head.kernel == "liger":
        nll, hits = liger_token_nll(flat, head, targets.reshape(-1))
    else:
        nll, hits = ChunkedTokenNLL.apply(flat, head.weight, head.bias, targets.reshape(-1),
                                          chunk_for(head.weight.shape[0]), summed and torch.is_grad_enabled())
    return nll.view(targets.shape), hits.view(targets.shape)


def liger_token_nll(flat: torch.Tensor, head: "PassThroughHead",
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same per-position NLL and hits from Liger's fused linear cross-entropy (Triton, CUDA), which also
    never forms the whole logits; per-token losses (reduction "none") take any upstream gradient."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    bias = None if head.bias is None else head.bias.to(flat.dtype)
    out = liger_fused_linear_cross_entropy(flat, head.weight.to(flat.dtype), targets, bias, ignore_index=IGNORE,
                                           reduction="none", return_predicted_tokens=True)
    valid = targets != IGNORE
    return out.loss.float() * valid, (out.predicted_tokens == targets) & valid


class PassThroughHead(nn.Module):
    """The output head's parameters under their own names; with `passing` it returns its input unchanged."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self.passing = False
        self.kernel = "chunked"  # or "liger" (`enable_liger_kernel`)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.passing else F.linear(hidden, self.weight, self.bias)


def installed_head(model: Any) -> PassThroughHead | None:
    base = model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if isinstance(head, PassThroughHead) and head.passing else None


def install(model: Any, check: Any, kernel: str = "chunked") -> bool:
    """Replace a plain nn.Linear output head by PassThroughHead when `check(model)` (which compares the chunked
    loss with the plain one) passes; True when installed. `kernel`: the head + loss behind it, chunked or liger."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    placed = isinstance(head, PassThroughHead)
    if not placed and type(head) is not nn.Linear:
        return False
    chunked = head if placed else PassThroughHead(head)
    base.set_output_embeddings(chunked)
    chunked.passing, chunked.kernel = True, kernel
    if check(model):
        return True
    if placed:
        chunked.passing = False  # stays in place (a sharded model's modules cannot be swapped), as a plain head
    else:
        base.set_output_embeddings(head)
    log.warning("the %s head + loss did not match the plain one on this model; using the plain path", kernel)
    return False


def place(model: Any) -> None:
    """Put a PassThroughHead in place of a plain linear head, switched off (it computes the logits) until
    `install` checks it; for models whose modules cannot be replaced later (sharded by FSDP)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is nn.Linear:
        base.set_output_embeddings(PassThroughHead(head))
