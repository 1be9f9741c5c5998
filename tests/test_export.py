"""`tunesmith export`: merged logits equal base + adapters, shards, legacy format, chat template, safety."""

from __future__ import annotations

import json
import pytest
import torch

from conftest import write_dataset
from test_train import sft_rows, train
from tunesmith import export as export_mod
from tunesmith.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """Two LoRA adapters trained one after the other (the second on top of the first)."""
    tmp = tmp_path_factory.mktemp("export")
    write_dataset(tmp / "data", "sft", sft_rows())
    first = train(tmp, tiny_model_dir, tmp / "data", "a1", "max_steps=3", "lora_target=all")
    second = train(tmp, tiny_model_dir, tmp / "data", "a2", "max_steps=3", "lora_target=q_proj", "seed=2")
    return tmp, first, second


def run_export(model_dir, adapters, out, *extra):
    return main(["export", f"model_name_or_path={model_dir}", f"adapter_name_or_path={adapters}",
                 f"export_dir={out}", "export_dtype=float32", *extra])


@torch.no_grad()
def test_merged_logits_equal_base_plus_adapters(trained, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, first, second = trained
    out = tmp_path / "merged"
    assert run_export(tiny_model_dir, f"{first},{second}", out, "--verify") == 0
    assert "verify OK: the exported model's logits differ" in capsys.readouterr().out
    import os
    mask = os.umask(0)
    os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~mask)}  # weights as readable as the rest
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(PeftModel.from_pretrained(base, first).merge_and_unload(), second).eval()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["What is 3 plus 4?", "法国的首都是哪里？"], return_tensors="pt", padding=True).input_ids
    diff = (reference(input_ids=ids).logits - exported(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-5
    # the adapter really changed the model
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert float((plain(input_ids=ids).logits - exported(input_ids=ids).logits).abs().max()) > 1e-3


def test_chat_template_and_generation_config(trained, tiny_model_dir, tmp_path, tokenizer):
    from transformers import AutoTokenizer, GenerationConfig

    from tunesmith.data.conversation import Conversation, Message
    from tunesmith.data.templates import load_template

    tmp, first, _ = trained
    out = tmp_path / "tmpl"
    assert run_export(tiny_model_dir, first, out) == 0
    exported = AutoTokenizer.from_pretrained(out)
    conv = Conversation([Message("user", "hi"), Message("assistant", "yo")], system="S")
    [trained] = load_template("chatml", tokenizer).render_chat(conv)
    trained_text = trained.text
    assert exported.apply_chat_template(conv.hf_messages(), tokenize=False) == trained_text
    gen = GenerationConfig.from_pretrained(out)
    im_end = exported.convert_tokens_to_ids("<|im_end|>")
    assert im_end in (gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    card = (out / "README.md").read_text()
    assert str(first) in card and "tunesmith" in card and "Training config" in card


def test_shards_follow_export_size_and_legacy_format(trained, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tmp, first, _ = trained
    size = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    limit_gb = size / 4 / 1e9  # about a quarter of the model per shard
    out = tmp_path / "sharded"
    assert run_export(tiny_model_dir, first, out, f"export_size={limit_gb}") == 0
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:  # within the limit, unless one tensor alone is larger
        tensors = [k for k, v in index["weight_map"].items() if v == shard.name]
        assert shard.stat().st_size <= limit_gb * 1e9 + 1024 or len(tensors) == 1
    legacy = tmp_path / "legacy"
    assert run_export(tiny_model_dir, first, legacy, "export_legacy_format=true") == 0
    assert list(legacy.glob("*.bin")) and not list(legacy.glob("*.safetensors"))
    a = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(legacy, dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_and_full_model_reexport(trained, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert main(["export", f"model_name_or_path={tiny_model_dir}", f"export_dir={out}", "export_dtype=bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_overwrite_protection_and_killed_export(trained, tiny_model_dir, tmp_path, monkeypatch, capsys):
    tmp, first, _ = trained
    out = tmp_path / "busy"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert run_export(tiny_model_dir, first, out) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"

    def killed(*args, **kwargs):
        raise OSError("killed mid-write")

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(export_mod, "replace_folder", killed)
    with pytest.raises(OSError):
        run_export(tiny_model_dir, first, fresh)
    assert not fresh.exists(), "a killed export leaves no folder under the final name"
    assert [p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith("fresh")] == ["fresh.tmp"]
    monkeypatch.undo()
    assert run_export(tiny_model_dir, first, out, "--force") == 0
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("busy.")], "no temporary folders left behind"


def test_a_model_without_sdpa_in_transformers_loads_with_eager_attention(tmp_path, tokenizer):
    """`attn_implementation: auto` asks for SDPA; Gemma 2 has none in transformers, so it falls back to eager."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    from tunesmith.config import load_config
    from tunesmith.model.loading import load_model

    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")
    model = load_model(load_config([f"model_name_or_path={tmp_path / 'gemma2'}"]), torch.float32, for_training=False)
    assert model.config._attn_implementation == "eager"
