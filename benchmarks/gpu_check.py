"""GPU check: sft LoRA and full fine-tuning in bf16 on a generated ~0.5B Llama, fp16 with loss scaling, the
packed (padding-free) path, FSDP and DeepSpeed ZeRO-3 (one process each, with a stop/resume), a short predict and
eval. One JSON line per check: tokens/s, MFU against the card's
bf16 dense peak, peak GPU memory. Run through scripts/gpu_check.sh (no network needed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def card_peak(name: str) -> float | None:
    return next((v * 1e12 for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def build(folder: Path) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(name: str, args: list[str], params: int, work: Path, launcher: tuple[str, ...] = (),
        keep: str | None = None) -> Path:
    """One tunesmith command; `keep` names a checkpoint of an earlier output folder to resume from."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    if keep and not (work / keep).is_dir():
        print(json.dumps({"check": name, "ok": False, "error": f"no {keep} to resume from"}), flush=True)
        return out
    if keep:
        out.mkdir(parents=True)
        shutil.copytree(work / keep, out / Path(keep).name)
    start = time.time()
    prefix = [sys.executable, "-m", *launcher] if launcher else [sys.executable]
    code = subprocess.run([*prefix, "-m", "tunesmith.cli", *args, f"output_dir={out}", "disable_tqdm=true"],
                          cwd=ROOT, capture_output=True, text=True)
    line: dict = {"check": name, "ok": code.returncode == 0, "wall_s": round(time.time() - start, 1)}
    if code.returncode != 0:
        line["error"] = code.stderr[-1500:]
    elif (out / "trainer_log.jsonl").is_file():
        logs = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines() if '"loss"' in l]
        tokens_per_s = sum(l["tokens_per_s"] for l in logs[1:]) / max(len(logs) - 1, 1)
        line.update(tokens_per_s=round(tokens_per_s), final_loss=logs[-1]["loss"])
        if keep:
            line["resumed_from"] = keep
        import torch

        peak = card_peak(torch.cuda.get_device_name())
        if peak:
            line["mfu"] = round(6 * params * tokens_per_s / peak, 3)
    results = out / "train_results.json"
    if results.is_file():
        line["peak_gpu_memory_gb"] = json.loads(results.read_text()).get("train_peak_gpu_memory_gb")
    print(json.dumps(line), flush=True)
    return out


def sharded_runs(base: list[str], params: int, work: Path) -> None:
    """FSDP through accelerate and ZeRO-3 through DeepSpeed, each stopped at a checkpoint and resumed: the
    resumed run's final loss must equal the straight run's."""
    import importlib.util

    full = ["train", *base, "finetuning_type=full", "bf16=true", "learning_rate=1e-5", "max_steps=10",
            "save_strategy=steps", "save_steps=5"]
    fsdp = ("accelerate.commands.launch", "--config_file", "examples/accelerate/fsdp.yaml", "--num_processes", "1")
    run("sft-full-bf16-fsdp", full, params, work, fsdp)
    run("sft-full-bf16-fsdp-resumed", full, params, work, fsdp, keep="sft-full-bf16-fsdp/checkpoint-5")
    if importlib.util.find_spec("deepspeed") is None:
        print(json.dumps({"check": "deepspeed", "ok": None, "skipped": "deepspeed is not installed"}), flush=True)
        return
    zero3 = [*full, "deepspeed=examples/deepspeed/ds_z3_config.json"]
    run("sft-full-bf16-zero3", zero3, params, work, ("torch.distributed.run", "--nproc_per_node", "1"))
    run("sft-full-bf16-zero3-resumed", zero3, params, work, ("torch.distributed.run", "--nproc_per_node", "1"),
        keep="sft-full-bf16-zero3/checkpoint-5")


def main() -> None:
    import torch

    assert torch.cuda.is_available(), "no CUDA GPU"
    work = Path(tempfile.mkdtemp(prefix="tunesmith-gpu-"))
    model = work / "model-0.5b"
    params = build(model)
    print(json.dumps({"check": "setup", "gpu": torch.cuda.get_device_name(), "params": params,
                      "torch": torch.__version__}), flush=True)
    base = [f"model_name_or_path={model}", "template=chatml", "dataset=alpaca_en_demo,glaive_toolcall_demo",
            f"dataset_dir={ROOT / 'data'}", "cutoff_len=1024", "logging_steps=5", "save_strategy=no",
            "per_device_train_batch_size=8", "max_steps=30", "learning_rate=1e-4", f"data_cache_dir={work / 'cache'}"]
    run("sft-lora-bf16", ["train", *base, "finetuning_type=lora", "lora_target=all", "bf16=true"], params, work)
    run("sft-full-bf16", ["train", *base, "finetuning_type=full", "bf16=true", "learning_rate=1e-5"], params, work)
    run("sft-lora-fp16", ["train", *base, "finetuning_type=lora", "lora_target=all", "fp16=true"], params, work)
    run("sft-lora-bf16-packing", ["train", *base, "finetuning_type=lora", "bf16=true", "packing=true"], params, work)
    sharded_runs(base, params, work)
    run("predict", ["predict", f"model_name_or_path={model}", "template=chatml", "dataset=alpaca_en_demo",
                    f"dataset_dir={ROOT / 'data'}", "max_samples=64", "max_new_tokens=32",
                    "per_device_eval_batch_size=16", "infer_dtype=bfloat16"], params, work)
    run("eval", ["eval", f"model_name_or_path={model}", "template=vanilla", "task=mmlu_demo",
                 f"task_dir={ROOT / 'evaluation'}", "n_shot=5", "batch_size=8", "infer_dtype=bfloat16",
                 f"save_dir={work / 'eval'}"], params, work)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
