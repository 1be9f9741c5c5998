"""The memory estimate and the `auto` checkpointing / tokens-per-pass choice made from it before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunesmith.config import load_config
from tunesmith.config.loader import ConfigError
from tunesmith.train import memory_budget as mb

GIB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent


def llama_folder(tmp_path, **shape):
    from transformers import LlamaConfig

    config = LlamaConfig(**{"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
                            "tie_word_embeddings": False, **shape})
    folder = tmp_path / "model"
    config.save_pretrained(folder)
    return folder, config


def test_the_shape_counts_the_parameters_the_model_has(tmp_path):
    from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder, config = llama_folder(tmp_path, head_dim=48)  # head_dim not hidden / heads, as in Qwen3 and Gemma
    assert mb.model_shape(str(folder)).params() == sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    tied = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True)
    tied.save_pretrained(tmp_path / "qwen")
    real = sum(p.numel() for p in Qwen2ForCausalLM(tied).parameters())
    counted = mb.model_shape(str(tmp_path / "qwen")).params()
    biases = 3 * (64 + 2 * 32)  # q/k/v biases, which the estimate leaves out
    assert counted == real - biases
    assert mb.model_shape(str(tmp_path / "missing")) is None


def cfg_for(folder, *extra):
    return load_config([f"model_name_or_path={folder}", "output_dir=o", *extra])


def test_weights_and_states_by_finetuning_type(tmp_path):
    folder, _ = llama_folder(tmp_path)
    shape = mb.model_shape(str(folder))
    p = shape.params()
    full = mb.estimate(shape, cfg_for(folder, "finetuning_type=full"), 4096, False)
    assert full.weights == 4 * p and full.trained == 8 * p  # fp32 weights, AdamW's two states (no gradients yet)
    stepping = mb.estimate(shape, cfg_for(folder, "finetuning_type=full"), 1, False)
    assert stepping.trained == 16 * p and stepping.activations == 0  # the optimizer step is the peak: + gradients
    # and AdamW's temporary
    lora_bf16 = mb.estimate(shape, cfg_for(folder, "bf16=true"), 4096, False)
    assert lora_bf16.weights == 2 * p  # the frozen base in bf16
    lora_params = mb.trained_params(shape, cfg_for(folder))
    expected = 2 * 8 * sum(a + b for a, b in shape.linear_shapes().values())  # layers x rank 8 x (in + out)
    assert lora_params == expected and lora_bf16.trained == 12 * lora_params  # fp32 value + AdamW states
    qlora = mb.estimate(shape, cfg_for(folder, "quantization_bit=4"), 4096, False)
    linear = shape.layers * shape.layer_linear_params()
    assert qlora.weights == pytest.approx(linear * (0.5 + 0.5 / 64) + (p - linear) * 4)
    accumulating = mb.estimate(shape, cfg_for(folder, "finetuning_type=full", "gradient_accumulation_steps=2"),
                               4096, False)
    assert accumulating.trained == 12 * p  # gradients live through the later passes of the step
    ds = ROOT / "examples" / "deepspeed"
    zero2 = mb.estimate(shape, cfg_for(folder, "finetuning_type=full", f"deepspeed={ds / 'ds_z2_config.json'}"),
                        4096, False, world=4)
    assert zero2.weights == full.weights and zero2.trained == 2 * p  # states sharded over 4 processes
    offload = mb.estimate(shape, cfg_for(folder, "finetuning_type=full",
                                         f"deepspeed={ds / 'ds_z3_offload_config.json'}"), 4096, False, world=2)
    assert offload.weights == 0 and offload.trained == 0  # parameters and optimizer live on the CPU


def saved_bytes_per_token(model, tokens):
    """What autograd keeps for the backward in a forward of the decoder layers (weights excluded)."""
    from tunesmith.train.memory import _pack, _unpack

    seen = {}

    def pack(t):
        packed = _pack(t)
        if isinstance(packed, torch.Tensor):
            seen[packed.untyped_storage().data_ptr()] = packed.untyped_storage().nbytes()
        return packed

    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        model.model(input_ids=ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in weights) / tokens


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_activation_coefficients_match_what_autograd_keeps(tmp_path, finetuning_type):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    folder, config = llama_folder(tmp_path, hidden_size=256, intermediate_size=688, num_key_value_heads=4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    if finetuning_type == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear")).base_model.model
    measured = saved_bytes_per_token(model, 256)
    cfg = cfg_for(folder, f"finetuning_type={finetuning_type}")
    shape = mb.model_shape(str(folder))
    a_h, a_i, a_kv = mb.ACTIVATION_BYTES[("lora" if finetuning_type == "lora" else "full", 4)]
    estimated = shape.layers * (a_h * shape.hidden + a_i * shape.intermediate + a_kv * shape.kv_width)
    assert estimated == pytest.approx(measured, rel=0.1)
    est = mb.estimate(shape, cfg, 256, False)
    assert est.activations == pytest.approx(256 * estimated)


def plan(monkeypatch, tmp_path, room, *extra, **shape):
    folder, _ = llama_folder(tmp_path, **shape)
    monkeypatch.setattr(mb, "capacity", lambda: (room, "a test device"))
    cfg = cfg_for(folder, "cutoff_len=1024", "per_device_train_batch_size=8", *extra)
    return cfg, mb.plan_memory(cfg, 1, 1, True)


def test_auto_keeps_one_pass_per_micro_batch_where_it_fits(monkeypatch, tmp_path):
    cfg, est = plan(monkeypatch, tmp_path, 100 * GIB)
    assert cfg.training.gradient_checkpointing is False and cfg.training.max_tokens_per_forward == 0
    assert est.tokens == 8 * 1024


def test_auto_bounds_passes_then_checkpoints_as_memory_shrinks(monkeypatch, tmp_path):
    shape = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=32000)
    folder, _ = llama_folder(tmp_path, **shape)
    s = mb.model_shape(str(folder))
    base = cfg_for(folder, "cutoff_len=1024", "per_device_train_batch_size=8")
    whole = mb.estimate(s, base, 8192, False).total
    one_sample = mb.estimate(s, base, 1024, False, several_passes=True).total
    checkpointed = mb.estimate(s, base, 1024, True, several_passes=True).total
    assert checkpointed < one_sample < whole
    cfg, est = plan(monkeypatch, tmp_path, (one_sample + whole) / 2, **shape)
    bound = cfg.training.max_tokens_per_forward
    assert cfg.training.gradient_checkpointing is False and 1024 <= bound < 8192 and est.total <= (one_sample + whole) / 2
    cfg, est = plan(monkeypatch, tmp_path, (checkpointed + one_sample) / 2, **shape)
    assert cfg.training.gradient_checkpointing is True and est.total <= (checkpointed + one_sample) / 2
    with pytest.raises(ConfigError, match="quantization_bit: 4.*cutoff_len"):
        plan(monkeypatch, tmp_path, checkpointed / 2, **shape)


def test_explicit_values_win(monkeypatch, tmp_path):
    cfg, _ = plan(monkeypatch, tmp_path, 100 * GIB, "gradient_checkpointing=true", "max_tokens_per_forward=2048")
    assert cfg.training.gradient_checkpointing is True and cfg.training.max_tokens_per_forward == 2048
    cfg, est = plan(monkeypatch, tmp_path, 1.0, "gradient_checkpointing=false", "max_tokens_per_forward=0")
    assert cfg.training.gradient_checkpointing is False and est.total > 1.0  # too big: run anyway, with a warning
    cfg, _ = plan(monkeypatch, tmp_path, 100 * GIB, "disable_gradient_checkpointing=false")  # LLaMA-Factory's key
    assert cfg.training.gradient_checkpointing is True


def test_unknown_architectures_keep_the_plain_defaults(monkeypatch, tmp_path):
    cfg = cfg_for(tmp_path / "nowhere")
    assert mb.plan_memory(cfg, 1, 1, True) is None
    assert cfg.training.gradient_checkpointing is False and cfg.training.max_tokens_per_forward == 0


def test_a_training_run_logs_the_estimate_and_saves_auto(tmp_path, tiny_model_dir, capsys):
    from conftest import sft_rows, write_dataset
    from tunesmith.cli import main

    write_dataset(tmp_path / "data", "sft", sft_rows(8))
    out = tmp_path / "out"
    assert main(["train", f"model_name_or_path={tiny_model_dir}", f"dataset_dir={tmp_path / 'data'}",
                 "dataset=sft", "template=chatml", f"output_dir={out}", "max_steps=1", "save_strategy=no",
                 "disable_tqdm=true", f"data_cache_dir={tmp_path / 'cache'}"]) == 0
    logged = capsys.readouterr().err
    line = next(l for l in logged.splitlines() if "memory: estimated peak" in l)
    assert "gradient_checkpointing False" in line and "max_tokens_per_forward 0" in line
    saved = (out / "tunesmith_config.yaml").read_text()
    assert "gradient_checkpointing: auto" in saved and "max_tokens_per_forward: auto" in saved
