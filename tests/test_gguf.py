"""GGUF export: the pre-tokenizer fallback and the Modelfile (fast); converting a LoRA-tuned tiny model with
llama.cpp's converter (f16, q8_0: metadata, tensor types, template) and checking it in llama.cpp itself (slow:
fetches the converter, needs llama-cpp-python; scripts/install_llama_cpp.sh builds it once)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import TINY_MODEL
from tunesmith import export_gguf
from tunesmith.cli import main


def test_standard_pre_tokenizers_are_named_from_tokenizer_json(tmp_path):
    def named(pre):
        (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre}))
        return export_gguf._standard_pre_tokenizer(tmp_path)

    assert named({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    llama3 = next(k for k, v in export_gguf._SPLIT_PRE.items() if v == "llama-bpe")
    split = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": llama3}},
                                                   {"type": "ByteLevel", "use_regex": False}]}
    assert named(split) == "llama-bpe"
    assert named({"type": "Metaspace"}) is None and named(None) is None


def test_modelfile_points_at_the_file_and_stops_at_the_end_of_turn():
    text = export_gguf.modelfile("m.f16.gguf", ["<|im_end|>", ""])
    assert "FROM ./m.f16.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text and text.count("PARAMETER") == 1


def test_legacy_format_and_gguf_are_refused_together(tmp_path, capsys):
    assert main(["export", f"model_name_or_path={TINY_MODEL}", f"export_dir={tmp_path / 'x'}",
                 "export_format=gguf", "export_legacy_format=true"]) == 2
    assert "does not apply to `export_format: gguf`" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from conftest import sft_rows, write_dataset

    root = tmp_path_factory.mktemp("gguf")
    write_dataset(root / "data", "sft", sft_rows())
    out = root / "lora"
    assert main(["train", f"model_name_or_path={TINY_MODEL}", f"dataset_dir={root / 'data'}", "dataset=sft",
                 "template=chatml", f"output_dir={out}", "max_steps=8", "learning_rate=1e-2", "lora_target=all",
                 "save_strategy=no", "disable_tqdm=true", f"data_cache_dir={root / 'cache'}"]) == 0
    return out


def export(tmp_path, adapter, gguf_type, *extra):
    out = tmp_path / f"export_{gguf_type}"
    rc = main(["export", f"model_name_or_path={TINY_MODEL}", f"adapter_name_or_path={adapter}",
               f"export_dir={out}", "export_format=gguf", f"gguf_type={gguf_type}", *extra])
    return rc, out


def reader(path):
    sys.path.insert(0, str(export_gguf.converter_source(None) / "gguf-py"))
    from gguf import GGUFReader

    return GGUFReader(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type,weights", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_conversion_writes_weights_tokenizer_and_template(tmp_path, adapter, gguf_type, weights, tokenizer):
    rc, out = export(tmp_path, adapter, gguf_type)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", f"{out.name}.{gguf_type}.gguf"]
    assert not list(tmp_path.glob("*.tmp-*"))
    gguf = reader(out / f"{out.name}.{gguf_type}.gguf")
    field = lambda key: gguf.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(gguf.fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    from transformers import AutoTokenizer

    assert field("tokenizer.chat_template") == AutoTokenizer.from_pretrained(adapter).chat_template
    matrices = [t for t in gguf.tensors if len(t.shape) == 2 and "token_embd" not in t.name]
    assert matrices and all(t.tensor_type.name == weights for t in matrices)
    rc, _ = export(tmp_path, adapter, gguf_type)
    assert rc == 2  # a non-empty target needs --force


needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (bash scripts/install_llama_cpp.sh)")


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_reproduces_the_merged_model(tmp_path, adapter, capsys):
    rc, out = export(tmp_path, adapter, "f16", "--verify")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "verify OK: llama.cpp tokenizes 5/5 prompts" in printed and "identical for 5/5" in printed


@pytest.mark.slow
@needs_llama_cpp
def test_the_template_in_the_metadata_renders_like_the_tokenizer(tmp_path, adapter):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    rc, out = export(tmp_path, adapter, "q8_0", "--verify")
    assert rc == 0
    llm = Llama(model_path=str(out / f"{out.name}.q8_0.gguf"), n_ctx=64, verbose=False)
    tok = AutoTokenizer.from_pretrained(adapter)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 plus 3?"}]
    from_gguf = tok.apply_chat_template(chat, chat_template=llm.metadata["tokenizer.chat_template"], tokenize=False,
                                        add_generation_prompt=True)
    assert from_gguf == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma3"])
def test_other_architectures_convert_and_match_in_llama_cpp(tmp_path, arch, tokenizer, capsys):
    """Random tiny models of these families (the shipped tokenizer) through the same export and check. Gemma 3
    as released up to 12B: the attention scale's query_pre_attn_scalar equals head_dim (llama.cpp assumes it)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Qwen2Config, Qwen3Config

    kind = {"mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig}[arch]
    extra = {"query_pre_attn_scalar": 16} if arch == "gemma3" else {}
    config = kind(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "gguf"
    assert main(["export", f"model_name_or_path={tmp_path / 'model'}", "template=chatml", f"export_dir={out}",
                 "export_format=gguf", "gguf_type=f32", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verify OK: llama.cpp tokenizes 5/5 prompts" in printed and "identical for 5/5" in printed
    expected = {"mistral": "llama"}.get(arch, arch)  # llama.cpp runs Mistral as its llama architecture
    assert reader(out / "gguf.f32.gguf").fields["general.architecture"].contents() == expected
