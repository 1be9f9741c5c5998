"""Shared fixtures: offline hub settings, the shipped tiny tokenizer, tiny random models built in code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-llama"
DATA_DIR = ROOT / "data"


@pytest.fixture(autouse=True, scope="session")
def offline_env(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


def make_tiny_model(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A random Llama with the shipped tokenizer, small enough for exact fp32 tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def write_dataset(folder: Path, name: str, rows, entry: dict | None = None, suffix: str = ".json") -> Path:
    """Write rows and register them in folder/dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text(rows, encoding="utf-8")
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {"file_name": path.name, **(entry or {})}
    info_path.write_text(json.dumps(info))
    return path


def sft_rows(n: int = 24) -> list[dict]:
    """Learnable alpaca rows: small sums."""
    return [{"instruction": f"What is {i} plus {i + 1}?", "output": f"{i} + {i + 1} = {2 * i + 1}."} for i in range(n)]


def keep_only_checkpoint(out: Path, name: str) -> None:
    """Make `out` look like a run stopped right after saving checkpoint `name`: only it, the saved config and
    the log remain."""
    import shutil

    for item in out.iterdir():
        if item.name not in (name, "tunesmith_config.yaml", "trainer_log.jsonl"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
