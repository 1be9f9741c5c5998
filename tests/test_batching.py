"""Padding-free batches: a packed row gives the same loss as each sample alone; the plan is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunesmith.data.batching import BatchPlan, collate, pack_by_tokens, pack_units
from tunesmith.data.encode import Encoded
from tunesmith.data.pipeline import EncodedSet
from tunesmith.train.loss import token_loss_sum


def random_set(n=5, vocab=2000, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        length = int(rng.integers(4, 30))
        ids = rng.integers(0, vocab, length).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        samples.append(Encoded(ids, labels))
    return EncodedSet.from_samples(samples)


@pytest.mark.parametrize("padding_free,varlen", [(True, False), (True, True), (False, False)])
def test_packed_loss_equals_separate_samples(tiny_model_dir, padding_free, varlen):
    from transformers import AutoModelForCausalLM

    from tunesmith.model.attention import register

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    if varlen:
        model.set_attn_implementation(register())
    data = random_set()
    together = collate(data, [[i] for i in range(len(data))], padding_free, pad_id=0)
    loss, count = token_loss_sum(model, together)
    separate = [token_loss_sum(model, collate(data, [[i]], True, 0)) for i in range(len(data))]
    assert count == sum(c for _, c in separate) == data.supervised_tokens()
    assert float(loss) == pytest.approx(float(sum(l for l, _ in separate)), rel=1e-5)


def test_shape_buckets_change_no_loss(tiny_model_dir):
    """Rows rounded to 64 tokens with a padding segment, and kept head positions rounded with repeats, give the
    same loss and count as the exact shapes."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model.attention import register

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.set_attn_implementation(register())
    data = random_set()
    exact = collate(data, [[i] for i in range(len(data))], True, pad_id=0)
    rounded = collate(data, [[i] for i in range(len(data))], True, pad_id=0, bucket=64)
    assert rounded.input_ids.shape[1] % 64 == 0 and rounded.input_ids.shape[1] < exact.input_ids.shape[1] + 64
    assert rounded.n_tokens == exact.n_tokens == exact.input_ids.numel()
    assert rounded.seq_bounds[:-1] == exact.seq_bounds and rounded.n_targets == exact.n_targets
    loss, count = token_loss_sum(model, exact)
    bucketed, bucketed_count = token_loss_sum(model, rounded, bucket=64)
    assert bucketed_count == count
    assert float(bucketed) == pytest.approx(float(loss), rel=1e-6)


def test_plan_is_deterministic_and_shards_without_overlap():
    data = random_set(n=11)
    plan = BatchPlan(data, batch_size=2, seed=3, shuffle=True)
    assert plan.micro_batches(0) == BatchPlan(data, 2, 3, True).micro_batches(0)
    assert plan.micro_batches(0) != plan.micro_batches(1)
    ranks = [BatchPlan(data, 2, 3, True, rank=r, world=2).micro_batches(0) for r in range(2)]
    seen = [i for r in ranks for batch in r for unit in batch for i in unit]
    assert sorted(seen) == list(range(11))
    assert len(ranks[0]) == len(ranks[1]) == len(BatchPlan(data, 2, 3, True, world=2))


def test_pack_units_respects_capacity():
    lengths = np.array([5, 9, 3, 7, 2])
    bins = pack_units(lengths, [0, 1, 2, 3, 4], capacity=10)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(lengths[b].sum() <= 10 for b in bins)


def test_padding_free_check_accepts_honest_models_and_rejects_leaky_ones(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.train.kernels import padding_free_works

    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
        assert padding_free_works(model, model.config.vocab_size)
    leaky = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    leaky.config._attn_implementation = "eager"
    original = leaky.forward

    def ignores_position_resets(**kwargs):  # plain causal attention over the whole row
        kwargs.pop("position_ids", None)
        return original(**kwargs)

    leaky.forward = ignores_position_resets
    assert not padding_free_works(leaky, leaky.config.vocab_size)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("length", [37, 300])
@torch.enable_grad()
def test_blocked_cpu_attention_matches_sdpa(kv_heads, length):
    """The blocked CPU attention (one block at 37 tokens, three of 128 queries at 300) equals PyTorch's SDPA:
    to float rounding in fp32, within bf16 rounding in bf16, forward and backward, with grouped key/value heads."""
    import torch.nn.functional as F

    from tunesmith.model import attention

    gen = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(1, h, length, 16, generator=gen) for h in (4, kv_heads, kv_heads))
    reference = [t.clone().requires_grad_() for t in (q32, k32, v32)]
    expected = F.scaled_dot_product_attention(*reference, is_causal=True, enable_gqa=kv_heads != 4)
    expected.pow(2).sum().backward()
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 6e-2)):
        assert 4 * length**2 <= attention.BLOCKED_MAX_PROBS[dtype]  # the blocked path is the one under test
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (q32, k32, v32)]
        got = attention.cpu_causal(*inputs, dropout=0.0, scaling=None, gqa=kv_heads != 4)
        got.float().pow(2).sum().backward()
        torch.testing.assert_close(got.float(), expected.detach(), rtol=0, atol=atol / 2)
        for h, r in zip(inputs, reference):
            torch.testing.assert_close(h.grad.float(), r.grad, rtol=atol / 3, atol=atol)
        # the first query attends only to itself: its output is exactly its value row
        torch.testing.assert_close(got[0, :, 0].float(), inputs[2][0, :, 0].float().repeat_interleave(4 // kv_heads, 0))
    # keys that need no gradient (the first layer under LoRA on q/v) leave the other gradients as they were
    q, v = (t.clone().requires_grad_() for t in (q32, v32))
    attention.cpu_causal(q, k32, v, dropout=0.0, scaling=None, gqa=kv_heads != 4).pow(2).sum().backward()
    torch.testing.assert_close(q.grad, reference[0].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.grad, reference[2].grad, rtol=1e-5, atol=1e-5)


def test_pack_by_tokens_keeps_units_whole_in_few_passes():
    lengths = np.array([10, 30, 5, 50, 20, 20])
    units = [[0], [1], [2, 4], [3], [5]]  # 10, 30, 25, 50, 20 tokens
    # first-fit decreasing: 50 alone (over budget), 30 then 10, 25 and 20 apart at 40, together at 45
    assert pack_by_tokens(units, lengths, 40) == [[[3]], [[1], [0]], [[2, 4]], [[5]]]
    assert pack_by_tokens(units, lengths, 45) == [[[3]], [[1], [0]], [[2, 4], [5]]]
    assert pack_by_tokens(units, lengths, 1000) == [[[3], [1], [2, 4], [5], [0]]]
    assert pack_by_tokens([], lengths, 40) == [[]]
