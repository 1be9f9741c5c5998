"""Head + cross-entropy in chunks of positions: the same losses and gradients as the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import sft_rows, write_dataset
from tunesmith.cli import main
from tunesmith.train import head_loss
from tunesmith.train.head_loss import IGNORE, ChunkedTokenNLL


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("grads_ahead", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@torch.enable_grad()  # an earlier test in the suite may leave autograd off
def test_chunked_nll_equals_plain_cross_entropy(chunk, grads_ahead, uniform):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(50, 16, generator=gen).requires_grad_()
    bias = torch.randn(50, generator=gen).requires_grad_()
    targets = torch.randint(0, 50, (10,), generator=gen)
    targets[[2, 7]] = IGNORE
    upstream = torch.full((10,), 0.3) if uniform else torch.rand(10, generator=gen)  # a sum's, or dpo-like

    logits = F.linear(hidden, weight, bias)
    plain = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    (plain * upstream).sum().backward()
    expected = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None

    nll, hits = ChunkedTokenNLL.apply(hidden, weight, bias, targets, chunk, grads_ahead)
    (nll * upstream).sum().backward()
    torch.testing.assert_close(nll, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(hits, (logits.argmax(-1) == targets) & (targets != IGNORE))
    for got, want in zip((hidden.grad, weight.grad, bias.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunks_bound_the_logits_held_at_once():
    assert head_loss.chunk_for(151_936) * 151_936 <= head_loss.CHUNK_ELEMENTS
    assert head_loss.chunk_for(10) == head_loss.CHUNK_ELEMENTS // 10


def train_full(tmp_path, model_dir, name, *extra):
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, "sft", sft_rows(12))
    out = tmp_path / name
    assert main(["train", f"model_name_or_path={model_dir}", f"dataset_dir={data}", f"output_dir={out}",
                 f"data_cache_dir={tmp_path / 'cache'}", "dataset=sft", "template=chatml", "cutoff_len=64",
                 "finetuning_type=full", "per_device_train_batch_size=4", "learning_rate=1e-3", "max_steps=3",
                 "save_strategy=no", "disable_tqdm=true", "seed=1", *extra]) == 0
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("stage_args", [[], ["compute_accuracy=true"]])
def test_training_with_the_chunked_head_equals_the_plain_head(tmp_path, tiny_model_dir, monkeypatch, stage_args):
    chunked = train_full(tmp_path, tiny_model_dir, "chunked", *stage_args)
    monkeypatch.setattr(head_loss, "install", lambda model, check, kernel="chunked": False)
    plain = train_full(tmp_path, tiny_model_dir, "plain", *stage_args)
    assert chunked.keys() == plain.keys()
    for name in plain:  # the head and every layer below it got the same updates
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-4, atol=1e-5)  # Adam amplifies rounding


def stand_in_liger(calls: list) -> object:
    """A plain-PyTorch stand-in for liger_kernel.transformers.functional (Liger itself needs a CUDA GPU): it
    checks how tunesmith calls Liger's fused linear cross-entropy, not Liger."""
    import types

    def liger_fused_linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
                                         return_predicted_tokens=False, **rest):
        calls.append({"reduction": reduction, "ignore_index": ignore_index, "dtypes": (input.dtype, weight.dtype)})
        logits = F.linear(input, weight, bias).float()
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
        return types.SimpleNamespace(loss=loss, predicted_tokens=logits.argmax(-1))

    module = types.ModuleType("liger_kernel.transformers.functional")
    module.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy
    return module


@torch.enable_grad()
def test_liger_head_loss_is_called_per_token_and_matches_the_chunked_one(monkeypatch):
    import sys

    calls: list = []
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", stand_in_liger(calls))
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (2, 5), generator=gen)
    targets[0, :2] = IGNORE
    results = {}
    for kernel in ("chunked", "liger"):
        head = head_loss.PassThroughHead(linear)
        head.kernel = kernel
        nll, hits = head_loss.token_nll(hidden, head, targets, summed=False)
        weights = torch.arange(10.0).view(2, 5)  # per-position upstream gradients, as dpo's sequence sums
        (nll * weights).sum().backward()
        results[kernel] = (nll.detach(), hits, hidden.grad.clone(), linear.weight.grad.clone())
        hidden.grad, linear.weight.grad = None, None
    assert calls == [{"reduction": "none", "ignore_index": IGNORE, "dtypes": (torch.float32, torch.float32)}]
    for got, want in zip(results["liger"], results["chunked"]):
        if got.dtype == torch.bool:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(results["liger"][0][0, :2].abs().sum()) == 0.0  # ignored positions add nothing


def test_liger_is_refused_without_a_cuda_gpu(tmp_path, tiny_model_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    write_dataset(tmp_path / "data", "sft", sft_rows(4))
    code = main(["train", f"model_name_or_path={tiny_model_dir}", f"dataset_dir={tmp_path / 'data'}",
                 f"output_dir={tmp_path / 'out'}", "dataset=sft", "template=chatml", "enable_liger_kernel=true"])
    assert code == 2
    assert "`enable_liger_kernel`: Liger's kernels are Triton kernels for CUDA GPUs" in capsys.readouterr().err
