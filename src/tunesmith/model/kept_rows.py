"""The last decoder layer works only at the positions the loss reads.

The output head already runs only at supervised positions (`logits_to_keep`). One layer down the same holds: the
last layer's attention needs every position (as keys and values), but what follows it (residual add, norm, MLP)
is per position, and at a prompt position it feeds only that position's logits, which the loss never reads. So
after its attention the last layer keeps only the supervised rows: the fewer supervised tokens, the more of the
last layer's MLP is saved (figures in benchmarks/LOG.md), with the same loss and gradients (tested).

Applied to decoder layers whose forward is the pre-norm residual block below (an allow-list), only for training
with a plain loop (no gradient checkpointing, FSDP or DeepSpeed), and only after a check on the loaded model that
the kept rows' logits equal the full forward's. Without the keyword (evaluation, generation) the layer is the
original one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("tunesmith.model")

KEEP_ROWS_KWARG = "tunesmith_keep_rows"
# Layers whose forward is: h = x + attn(norm1(x)); out = h + mlp(norm2(h)) (checked in transformers 5.24)
PRE_NORM_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


class LastLayerAtKeptRows(nn.Module):
    """The same submodules under the same names (state-dict keys do not change), one more keyword."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.full_layer = [layer]  # in a list: not a child, so its weights are not registered twice
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        keep = kwargs.pop(KEEP_ROWS_KWARG, None)
        if keep is None or args:
            return self.full_layer[0](hidden_states, *args, **kwargs)
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        kept = (hidden_states + attended)[:, keep]
        return kept + self.mlp(self.post_attention_layernorm(kept))


def decoder_layers(model: Any) -> nn.ModuleList | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


@torch.no_grad()
def kept_rows_match(model: Any, vocab_size: int) -> bool:
    """Logits at a few positions of a random sequence: kept-rows forward against the full one."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)).to(device)
    keep = torch.tensor([3, 4, 9, 11], device=device)
    full = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits.float()
    kept = model(input_ids=ids, use_cache=False, logits_to_keep=0, **{KEEP_ROWS_KWARG: keep}).logits.float()
    model.train(was_training)
    if full.shape != kept.shape:
        return False
    # the same products on fewer rows: equal up to rounding (bf16/fp16 round each layer's output)
    half = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    error = float((full - kept).abs().mean() / full.abs().mean().clamp(min=1e-6))
    return error < (1e-2 if half else 1e-5)


def install(model: Any, vocab_size: int) -> bool:
    """Make the last decoder layer take `KEEP_ROWS_KWARG`; True when it was installed and checked."""
    layers = decoder_layers(model)
    if layers is None or type(layers[-1]).__name__ not in PRE_NORM_LAYERS:
        return False
    original = layers[-1]
    layers[-1] = LastLayerAtKeptRows(original)
    if kept_rows_match(model, vocab_size):
        return True
    layers[-1] = original
    log.warning("the last layer's kept-rows forward did not match the full forward on this model; not used")
    return False
