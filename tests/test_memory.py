"""Recomputing SiLU in the backward: the same gradients, bit for bit, with one activation per MLP fewer kept."""

from __future__ import annotations

import torch

from tunesmith.train import memory


def test_silu_recompute_gives_identical_gradients_and_keeps_less(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))

    def grads(context):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():  # inference commands run earlier in this process turn gradients off globally
            with context:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}

    kept = {"plain": 0, "recomputed": 0}

    def counting(label, pack):
        def hook(tensor):
            packed = pack(tensor)
            kept[label] += packed.numel() if isinstance(packed, torch.Tensor) else 0
            return packed
        return hook

    plain_loss, plain = grads(torch.autograd.graph.saved_tensors_hooks(counting("plain", lambda t: t), memory._unpack))
    loss, recomputed = grads(torch.autograd.graph.saved_tensors_hooks(counting("recomputed", memory._pack),
                                                                      memory._unpack))
    assert loss == plain_loss
    assert all(torch.equal(plain[n], recomputed[n]) for n in plain)
    layers, inter = model.config.num_hidden_layers, model.config.intermediate_size
    assert kept["plain"] - kept["recomputed"] == layers * ids.shape[1] * inter  # one silu(gate) per layer
