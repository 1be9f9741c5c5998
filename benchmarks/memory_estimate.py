"""The memory estimate (train/memory_budget.py) against the peak a CPU run measures, for several shapes.

Each case builds a random Llama-shaped model (saved in the dtype training loads it in, so its weights are mapped
from the file), then runs `tunesmith train` (stage pt, packed rows of cutoff_len, so every pass holds exactly
batch x cutoff_len tokens) for 3 steps in a fresh process. Measured = the peak bytes of the CPU memory pool (every
tensor of 256 KB or more the run allocated) + the mapped weights; that is the quantity a GPU reports as
`max_memory_allocated`. One JSON line per case: estimate, measured and their ratio.

    python benchmarks/memory_estimate.py [--cases a,b,c,d]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

CASES = {
    "a": dict(model=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=32000),
              train=dict(finetuning_type="lora", lora_target="all", lora_rank=16, per_device_train_batch_size=4)),
    "b": dict(model=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000),
              train=dict(finetuning_type="full", per_device_train_batch_size=2)),
    "c": dict(model=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                         num_key_value_heads=6, vocab_size=151936),
              train=dict(finetuning_type="lora", lora_target="q_proj,v_proj", lora_rank=8,
                         per_device_train_batch_size=4, gradient_checkpointing=True)),
    "d": dict(model=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=65536),
              train=dict(finetuning_type="freeze", freeze_trainable_layers=2, per_device_train_batch_size=8)),
    "e": dict(model=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000),
              train=dict(finetuning_type="lora", lora_target="all", lora_rank=16, per_device_train_batch_size=4,
                         bf16=True, allow_slow_bf16=True)),
}
CUTOFF = 512


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def build_model(folder: Path, shape: dict, dtype: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((ROOT / "models" / "tiny-llama" / name).read_bytes())
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_case(name: str, case: dict, work: Path) -> dict:
    from tunesmith.config import load_config
    from tunesmith.train.memory_budget import estimate, model_shape

    folder = work / name
    # saved as training loads it (a LoRA base under bf16 in bf16), so that the weights are mapped from the file
    bf16_base = case["train"].get("bf16") and case["train"]["finetuning_type"] == "lora"
    weights = build_model(folder / "model", case["model"], "bfloat16" if bf16_base else "float32")
    settings = {"model_name_or_path": str(folder / "model"), "stage": "pt", "dataset": "corpus_demo",
                "dataset_dir": str(ROOT / "data"), "cutoff_len": CUTOFF, "packing": True, "max_steps": 3,
                "output_dir": str(folder / "out"), "overwrite_output_dir": True, "save_strategy": "no",
                "disable_tqdm": True, "report_to": "none", "max_tokens_per_forward": 0,
                "gradient_checkpointing": False, **case["train"]}
    args = [f"{k}={v}" for k, v in settings.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf")}
    run = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *args], env=env, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if run.returncode:
        raise SystemExit(f"case {name} failed:\n{run.stderr[-3000:]}")
    results = json.loads((folder / "out" / "train_results.json").read_text())
    measured = results["train_cpu_pool_peak_mb"] * 2**20 + weights
    cfg = load_config(args)
    tokens = cfg.training.per_device_train_batch_size * CUTOFF
    est = estimate(model_shape(str(folder / "model")), cfg, tokens, bool(cfg.training.gradient_checkpointing))
    return {"case": name, **case["model"], **case["train"], "tokens_per_pass": tokens,
            "estimate_mb": round(est.total / 2**20), "measured_mb": round(measured / 2**20),
            "ratio": round(est.total / measured, 3),
            "parts_mb": {k: round(getattr(est, k) / 2**20) for k in ("weights", "trained", "activations", "in_flight")},
            "cpu": cpu_model()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunesmith-memory-") as work:
        for name in args.cases.split(","):
            print(json.dumps(run_case(name, CASES[name], Path(work))), flush=True)


if __name__ == "__main__":
    main()
