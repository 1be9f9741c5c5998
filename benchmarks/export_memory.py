"""Peak memory of `tunesmith export` (LoRA merge + write) against the model's size. Prints one JSON line per model.

    python benchmarks/export_memory.py [--hidden 1024 --layers 12]

Builds, under a temporary folder, a random Llama of the requested size (fp32) with a random LoRA adapter on every
linear layer, then runs the export in a fresh process and reads its peak RSS. `baseline_rss_mb` is the peak RSS of
a process that imports the same libraries and loads nothing, so `(peak - baseline) / model size` is what the merge
itself costs: 1.0 means the weights are held once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_peak_mb(cmd: list[str]) -> float:
    """Run cmd in a child process and return that child's own peak RSS (MB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    return usage.ru_maxrss / 1024


def make_model(folder: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 128, 1), tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    base = folder / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
    adapter = folder / "adapter"
    peft_model.save_pretrained(adapter)
    return base, adapter, size


def measure(name: str, base: Path, adapter: Path | None, size: int) -> dict:
    python = sys.executable
    baseline = child_peak_mb([python, "-c", "import torch, transformers, peft, tunesmith.export"])
    with tempfile.TemporaryDirectory() as out:
        cmd = [python, "-m", "tunesmith.cli", "export", f"model_name_or_path={base}", f"export_dir={out}/x"]
        if adapter:
            cmd.append(f"adapter_name_or_path={adapter}")
        peak = child_peak_mb(cmd)
    model_mb = size / 2**20
    return {"benchmark": "export_memory", "model": name, "model_mb": round(model_mb, 1),
            "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
            "merge_overhead_x_model": round((peak - baseline) / model_mb, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.build:
        tiny = ROOT / "models" / "tiny-llama"
        tiny_size = sum(p.stat().st_size for p in tiny.glob("*.safetensors"))
        print(json.dumps(measure("tiny-llama (shipped, bf16, no adapter)", tiny, None, tiny_size)), flush=True)
    if args.build:
        base, adapter, size = make_model(Path(args.build), args.hidden, args.layers)
        print(size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        # built in another process: a child forked from a parent holding the model would inherit its RSS
        built = subprocess.run([sys.executable, __file__, "--build", tmp, "--hidden", str(args.hidden), "--layers",
                                str(args.layers)], check=True, capture_output=True, text=True)
        base, adapter, size = Path(tmp) / "base", Path(tmp) / "adapter", int(built.stdout.split()[-1])
        print(json.dumps(measure(f"random llama h{args.hidden} x{args.layers} (fp32) + LoRA r16 all-linear",
                                 base, adapter, size)), flush=True)


if __name__ == "__main__":
    main()
