"""The GPU check: the paths users run, on a generated Qwen2.5-0.5B-shaped model with the real 151,936-token
vocabulary, each step asserted and timed out. Exit 1 when any step fails; one JSON line per step (tokens/s, MFU
against the card's bf16 dense peak, peak GPU memory).

Steps: bf16 LoRA sft with packing and gradient checkpointing; bf16 full sft with packing; QLoRA (4-bit nf4);
DPO with LoRA; a stop at checkpoint 5 and a resume whose final loss must equal the straight run's; predict with
the hf backend and, where installed, vLLM. `--smoke` runs the same steps on a tiny model on the CPU (fp32, no
QLoRA or vLLM) to check the script itself. Run on a GPU through scripts/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
STEP_TIMEOUT_S = 150
FAILED: list[str] = []

# hidden, layers, intermediate, heads, kv heads: Qwen2.5-0.5B's shape; the smoke shape is tiny
SHAPES = {"gpu": (896, 24, 4864, 14, 2), "smoke": (64, 2, 128, 4, 2)}


def build(folder: Path, smoke: bool) -> int:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    hidden, layers, intermediate, heads, kv = SHAPES["smoke" if smoke else "gpu"]
    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151_936, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    if not smoke:
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def card_peak() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def step(name: str, args: list[str], out: Path, params: int, expect: str | None = None, devices: int = 1) -> dict:
    """One tunesmith command with a timeout; its figures as a JSON line; a failure is recorded, not raised."""
    start = time.time()
    line: dict = {"check": name}
    try:
        done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *args, f"output_dir={out}", "disable_tqdm=true"],
                              cwd=ROOT, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        line["ok"] = done.returncode == 0 and (expect is None or (out / expect).is_file())
        if not line["ok"]:
            line["error"] = (done.stderr or done.stdout)[-1500:] or f"{expect} was not written"
    except subprocess.TimeoutExpired:
        line.update(ok=False, error=f"timed out after {STEP_TIMEOUT_S} s")
    line["wall_s"] = round(time.time() - start, 1)
    log = out / "trainer_log.jsonl"
    if line["ok"] and log.is_file():
        entries = [json.loads(l) for l in log.read_text().splitlines() if '"loss"' in l]
        steady = entries[1:] or entries
        tokens_per_s = sum(e["tokens_per_s"] for e in steady) / len(steady)
        line.update(tokens_per_s=round(tokens_per_s), final_loss=entries[-1]["loss"])
        if card_peak():
            # tokens/s are every process's together
            line["mfu"] = round(6 * params * tokens_per_s / (card_peak() * devices), 3)  # type: ignore[operator]
    results = out / "train_results.json"
    if results.is_file():
        line["peak_gpu_memory_gb"] = json.loads(results.read_text()).get("train_peak_gpu_memory_gb")
    if not line["ok"]:
        FAILED.append(name)
    print(json.dumps(line), flush=True)
    return line


def main() -> int:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script itself")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print(json.dumps({"check": "setup", "ok": False, "error": "no CUDA GPU (use --smoke on a CPU)"}))
        return 1
    work = Path(tempfile.mkdtemp(prefix="tunesmith-gpu-"))
    model = work / "model"
    params = build(model, args.smoke)
    print(json.dumps({"check": "setup", "ok": True, "params": params, "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}), flush=True)
    half = [] if args.smoke else ["bf16=true"]
    steps = 6 if args.smoke else 20
    base = [f"model_name_or_path={model}", "template=chatml", f"dataset_dir={ROOT / 'data'}",
            f"data_cache_dir={work / 'cache'}", "logging_steps=2", "save_strategy=no", "seed=1", *half,
            f"cutoff_len={256 if args.smoke else 1024}", f"per_device_train_batch_size={2 if args.smoke else 8}"]
    sft = ["train", *base, "dataset=alpaca_en_demo,glaive_toolcall_demo", f"max_steps={steps}"]
    step("sft-lora-packing-ckpt", [*sft, "finetuning_type=lora", "lora_target=all", "packing=true",
                                   "gradient_checkpointing=true", "learning_rate=1e-4"], work / "lora", params)
    step("sft-full-packing", [*sft, "finetuning_type=full", "packing=true", "learning_rate=1e-5"], work / "full", params)
    if not args.smoke and importlib.util.find_spec("bitsandbytes"):
        step("sft-qlora-4bit", [*sft, "finetuning_type=lora", "lora_target=all", "quantization_bit=4",
                                "learning_rate=1e-4"], work / "qlora", params)
    else:
        print(json.dumps({"check": "sft-qlora-4bit", "ok": None, "skipped": "bitsandbytes not installed (or --smoke)"}))
    if not args.smoke and importlib.util.find_spec("liger_kernel"):
        step("sft-lora-liger", [*sft, "finetuning_type=lora", "lora_target=all", "packing=true",
                                "enable_liger_kernel=true", "learning_rate=1e-4"], work / "liger", params)
    else:
        print(json.dumps({"check": "sft-lora-liger", "ok": None, "skipped": "liger-kernel not installed (or --smoke)"}))
    gpus = torch.cuda.device_count()
    if args.smoke or gpus >= 2:  # FSDP over every GPU (two gloo processes on a CPU)
        step("sft-full-fsdp", [*sft, "finetuning_type=full", "fsdp=full_shard", "learning_rate=1e-5",
                               f"nproc_per_node={2 if args.smoke else gpus}"], work / "fsdp", params,
             devices=max(gpus, 1))
    else:
        print(json.dumps({"check": "sft-full-fsdp", "ok": None, "skipped": "FSDP needs 2 or more GPUs"}))
    step("dpo-lora", ["train", *base, "stage=dpo", "dataset=preference_demo", "finetuning_type=lora",
                      f"max_steps={steps}", "learning_rate=5e-5"], work / "dpo", params)
    step("kto-lora", ["train", *base, "stage=kto", "dataset=kto_demo", "finetuning_type=lora",
                      f"max_steps={steps}", "learning_rate=5e-5"], work / "kto", params)
    step("grpo-lora", ["train", *base, "stage=grpo", "dataset=arithmetic_demo", "finetuning_type=lora",
                       f"max_steps={max(2, steps // 4)}", "num_generations=4", "max_new_tokens=32",
                       "reward_funcs=regex_format,math_answer", "learning_rate=1e-5"], work / "grpo", params)
    if importlib.util.find_spec("vllm") and not args.smoke:
        step("grpo-lora-vllm", ["train", *base, "stage=grpo", "dataset=arithmetic_demo", "finetuning_type=lora",
                                f"max_steps={max(2, steps // 4)}", "num_generations=4", "max_new_tokens=32",
                                "reward_funcs=regex_format,math_answer", "learning_rate=1e-5", "infer_backend=vllm",
                                "vllm_gpu_util=0.3", "vllm_maxlen=2048"], work / "grpo-vllm", params)
    else:
        print(json.dumps({"check": "grpo-lora-vllm", "ok": None, "skipped": "vLLM not installed (or --smoke)"}))
    resume_check(base, work, params, steps)
    predict = ["predict", f"model_name_or_path={model}", "template=chatml", "dataset=alpaca_en_demo",
               f"dataset_dir={ROOT / 'data'}", "max_samples=32", "max_new_tokens=16", "per_device_eval_batch_size=16",
               f"adapter_name_or_path={work / 'lora'}"]
    step("predict-hf", predict, work / "predict-hf", params, expect="generated_predictions.jsonl")
    if importlib.util.find_spec("vllm") and not args.smoke:
        step("predict-vllm", [*predict, "infer_backend=vllm"], work / "predict-vllm", params,
             expect="generated_predictions.jsonl")
    else:
        print(json.dumps({"check": "predict-vllm", "ok": None, "skipped": "vLLM not installed (or --smoke)"}))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"check": "summary", "ok": not FAILED, "failed": FAILED}), flush=True)
    return 1 if FAILED else 0


def resume_check(base: list[str], work: Path, params: int, steps: int) -> None:
    """A run stopped after checkpoint 5 and resumed must end at the straight run's loss."""
    args = ["train", *base, "dataset=alpaca_en_demo", "finetuning_type=lora", f"max_steps={steps}",
            "save_strategy=steps", "save_steps=5", "learning_rate=1e-4", "logging_steps=1"]  # one step per line
    straight = step("resume-straight", args, work / "straight", params)
    stopped = work / "stopped"
    stopped.mkdir()
    if not (work / "straight" / "checkpoint-5").is_dir():
        FAILED.append("resume")
        print(json.dumps({"check": "resume", "ok": False, "error": "no checkpoint-5 in the straight run"}))
        return
    shutil.copytree(work / "straight" / "checkpoint-5", stopped / "checkpoint-5")
    resumed = step("resume-resumed", args, stopped, params)
    a, b = straight.get("final_loss"), resumed.get("final_loss")
    same = a is not None and b is not None and abs(a - b) <= 1e-4 * abs(a)  # GPU kernels may round differently
    if not same:
        FAILED.append("resume")
    print(json.dumps({"check": "resume", "ok": same, "straight_loss": straight.get("final_loss"),
                      "resumed_loss": resumed.get("final_loss")}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
