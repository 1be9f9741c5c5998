"""Rebuild the shipped tiny base model in models/tiny-llama, reproducibly and offline:

    python scripts/build_tiny_model.py

1. trains a byte-level BPE tokenizer (English and Chinese) on the demo data, with a ChatML chat template;
2. initialises a small Llama-architecture model from a fixed seed;
3. pre-trains it with tunesmith's own `pt` stage on data/corpus_demo.jsonl (examples/tiny_pretrain.yaml);
4. copies the result, in bfloat16 safetensors, to models/tiny-llama.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INIT_DIR = ROOT / "outputs" / "tiny-llama-init"
PRETRAIN_DIR = ROOT / "outputs" / "tiny-llama-pretrain"
FINAL_DIR = ROOT / "models" / "tiny-llama"
VOCAB_SIZE = 2048
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def training_texts() -> list[str]:
    texts = []
    for path in sorted((ROOT / "data").glob("*.json*")):
        if path.name == "dataset_info.json":
            continue
        lines = path.read_text(encoding="utf-8")
        rows = json.loads(lines) if path.suffix == ".json" else [json.loads(l) for l in lines.splitlines() if l]
        for row in rows:
            texts.append(json.dumps(row, ensure_ascii=False))
    return texts


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(ROOT / "src"))
    from tunesmith.data.templates import named_to_jinja

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = named_to_jinja("chatml")[0]
    fast.save_pretrained(out)


def build_init_model(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)


def main() -> None:
    for d in (INIT_DIR, PRETRAIN_DIR):
        shutil.rmtree(d, ignore_errors=True)
    INIT_DIR.mkdir(parents=True)
    build_tokenizer(INIT_DIR)
    build_init_model(INIT_DIR)
    subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(ROOT / "examples" / "tiny_pretrain.yaml"),
                    f"model_name_or_path={INIT_DIR}", f"output_dir={PRETRAIN_DIR}"], check=True, cwd=ROOT)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(PRETRAIN_DIR, dtype=torch.float32)
    tmp = FINAL_DIR.with_name(FINAL_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(PRETRAIN_DIR).save_pretrained(tmp)
    shutil.rmtree(FINAL_DIR, ignore_errors=True)
    tmp.rename(FINAL_DIR)
    print(f"tiny model written to {FINAL_DIR}")


if __name__ == "__main__":
    main()
