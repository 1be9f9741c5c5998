"""Side-by-side sft LoRA benchmark: tunesmith vs LLaMA-Factory 0.9.5 on the same machine, model and data.

    python benchmarks/compare_llamafactory.py [--models tiny,small] [--dtypes fp32,bf16] [--samples 600] > out.jsonl
    python benchmarks/compare_llamafactory.py --readme out.jsonl   # regenerate the README table from the lines

Creates (once) a separate virtual environment with llamafactory==0.9.5 and the CPU build of torch in
.bench/llamafactory-venv (its torchvision is removed and torchaudio's compiled extensions are moved aside,
since the PyPI builds of both fail to load next to the CPU torch), builds random Llama models (about 3M and 30M
parameters, fixed seed) with the shipped tokenizer, writes a synthetic alpaca dataset with a long-tailed length
distribution, splits off 10% for evaluation (the same files for both tools), and runs the same job in both:
cutoff_len 1024, batch 4, accumulation 2, 1 epoch, LoRA on q_proj,v_proj, lr 1e-4 cosine, fp32 or bf16.
tunesmith also gets `parallel_passes: 2` (two passes at a time, one core each) and `max_tokens_per_forward`
1536 in fp32, 2048 in bf16 (at most that many tokens in flight: the same gradients, a bounded activation peak);
LLaMA-Factory keeps its defaults (gradient checkpointing on).

Prints one JSON line per case: wall time, training time, supervised tokens/s (the same count of supervised
training tokens divided by each tool's training time), peak RSS, the final eval loss of each tool's adapter
(computed the same way for both: token-weighted cross-entropy on the eval file), and the ratios. A last line
reports tunesmith's MFU for a full fine-tune of the small model against the measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
LF_VENV = BENCH / "llamafactory-venv"
MODELS = {"tiny": (256, 3, 688), "small": (512, 8, 1376)}  # hidden, layers, intermediate
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education").split()


def ensure_llamafactory() -> Path:
    python = LF_VENV / "bin" / "python"
    if not (LF_VENV / "bin" / "llamafactory-cli").exists():
        subprocess.run([sys.executable, "-m", "venv", str(LF_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0", "llamafactory==0.9.5"], check=True)
        subprocess.run(pip + ["nltk", "jieba", "rouge-chinese"], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision"], check=False)
    ta_lib = subprocess.run([str(python), "-c", "import importlib.util, os; "
                             "print(os.path.dirname(importlib.util.find_spec('torchaudio').origin))"],
                            capture_output=True, text=True).stdout.strip()
    if ta_lib:
        aside = BENCH / "torchaudio-lib-disabled"
        aside.mkdir(parents=True, exist_ok=True)
        for so in Path(ta_lib, "lib").glob("*.so"):
            shutil.move(str(so), aside / so.name)
    return LF_VENV / "bin" / "llamafactory-cli"


def build_model(name: str, folder: Path) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, layers, inter = MODELS[name]
    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def build_data(folder: Path, samples: int) -> None:
    """Alpaca rows whose prompt and answer lengths follow a long-tailed (log-normal) distribution."""
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(max(1, n)))  # noqa: E731
    rows = [{"instruction": text(int(rng.lognormvariate(3.3, 0.9))), "input": "",
             "output": text(int(rng.lognormvariate(3.8, 0.9)))} for _ in range(samples)]
    n_eval = samples // 10
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_train.json").write_text(json.dumps(rows[n_eval:]))
    (folder / "bench_eval.json").write_text(json.dumps(rows[:n_eval]))
    info = {"bench_train": {"file_name": "bench_train.json"}, "bench_eval": {"file_name": "bench_eval.json"}}
    (folder / "dataset_info.json").write_text(json.dumps(info))


def job(model: Path, data: Path, out: Path, bf16: bool) -> dict:
    return {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "lora_target": "q_proj,v_proj", "lora_rank": 8, "dataset": "bench_train", "eval_dataset": "bench_eval",
            "dataset_dir": str(data), "cutoff_len": 1024, "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4, "gradient_accumulation_steps": 2, "num_train_epochs": 1,
            "learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "logging_steps": 10,
            "save_strategy": "no", "output_dir": str(out), "overwrite_output_dir": True, "bf16": bf16,
            "seed": 42, "report_to": "none", "overwrite_cache": True}


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a command and everything it waits for."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DISABLE_VERSION_CHECK": "1", "WANDB_DISABLED": "true"}
    start = time.time()
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-c", wrapper, *cmd], stdout=handle, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=ROOT)
    wall = time.time() - start
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[:2]} failed, see {log}:\n{result.stderr[-3000:]}")
    return wall, int(result.stderr.strip().splitlines()[-1]) / 1024


def eval_loss(model: Path, adapter: Path, data: Path) -> tuple[float, int]:
    """Token-weighted eval cross-entropy of base + adapter (the same computation for both tools), and the
    number of supervised tokens in the training file."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.config import load_config
    from tunesmith.data.batching import collate
    from tunesmith.data.pipeline import build_datasets
    from tunesmith.data.templates import load_template
    from tunesmith.model.tokenizer import load_tokenizer
    from tunesmith.train.loss import token_loss_sum

    cfg = load_config([f"model_name_or_path={model}", "dataset=bench_train", "eval_dataset=bench_eval",
                       f"dataset_dir={data}", "cutoff_len=1024", "template=vanilla"])
    tokenizer = load_tokenizer(cfg)
    sets = build_datasets(cfg, tokenizer, load_template("vanilla", tokenizer), use_cache=False)
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), adapter).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(sets.eval), 8):
            loss, n = token_loss_sum(net, collate(sets.eval, [[j] for j in range(i, min(i + 8, len(sets.eval)))],
                                                  True, 0))
            total, count = total + float(loss), count + n
    return total / count, sets.train.supervised_tokens()


def run_tool(tool: str, name: str, dtype: str, work: Path, lf_cli: Path) -> tuple[float, float, float]:
    """One training run of one tool: wall seconds, peak RSS (MB), the tool's own training seconds."""
    import yaml

    model, data = work / f"model-{name}", work / "data"
    out = work / f"{tool}-{name}-{dtype}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = job(model, data, out, dtype == "bf16")
    if tool == "tunesmith":
        # Two passes at once, each on one core (the kernels of small models split over cores poorly), with at
        # most 1.5 x cutoff_len tokens in flight in fp32 (a sample longer than half of that runs alone on both
        # cores): the same gradients, a bounded activation peak (LLaMA-Factory's default memory saver is
        # gradient checkpointing, which recomputes the forward). bf16 activations are half the size: 2 x cutoff.
        cfg.update(template="vanilla", disable_tqdm=True, data_cache_dir=str(work / "cache"), parallel_passes=2,
                   max_tokens_per_forward=cfg["cutoff_len"] * (4 if dtype == "bf16" else 3) // 2,
                   allow_slow_bf16=True)  # the same arithmetic as LLaMA-Factory's, even where bf16 is emulated
        cmd = [sys.executable, "-m", "tunesmith.cli", "train"]
    else:
        cfg.update(template="empty", use_cpu=True, do_eval=False, eval_strategy="no",
                   preprocessing_num_workers=1, dataloader_num_workers=0, disable_tqdm=True)
        cmd = [str(lf_cli), "train"]
    cfg_path = work / f"{tool}-{name}-{dtype}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    wall, rss = run_measured(cmd + [str(cfg_path)], work / f"{tool}-{name}-{dtype}.log")
    return wall, rss, json.loads((out / "train_results.json").read_text())["train_runtime"]


def run_case(name: str, dtype: str, work: Path, lf_cli: Path, repeats: int = 1) -> dict:
    """Both tools, alternating, `repeats` times each: the fastest training time and the highest peak RSS of each
    tool count (the same rule for both), so one noisy run on a shared machine does not decide."""
    model, data = work / f"model-{name}", work / "data"
    runs: dict[str, list[tuple[float, float, float]]] = {"tunesmith": [], "llamafactory": []}
    for _ in range(repeats):
        for tool in runs:
            runs[tool].append(run_tool(tool, name, dtype, work, lf_cli))
    results = {}
    for tool, measured in runs.items():
        wall, _, train_time = min(measured, key=lambda m: m[2])
        loss, supervised = eval_loss(model, work / f"{tool}-{name}-{dtype}", data)
        results[tool] = {"wall_s": round(wall, 1), "train_s": round(train_time, 1),
                         "supervised_tokens_per_s": round(supervised / train_time, 1),
                         "peak_rss_mb": round(max(m[1] for m in measured)), "final_eval_loss": round(loss, 4),
                         "runs": len(measured)}
    ts, lf = results["tunesmith"], results["llamafactory"]
    return {"case": f"{name}-{dtype}", "tunesmith": ts, "llamafactory": lf,
            "speedup_tokens_per_s": round(ts["supervised_tokens_per_s"] / lf["supervised_tokens_per_s"], 2),
            "rss_ratio": round(ts["peak_rss_mb"] / lf["peak_rss_mb"], 2),
            "eval_loss_ratio": round(ts["final_eval_loss"] / lf["final_eval_loss"], 4)}


def matmul_peak(dtype_name: str) -> float:
    """Measured FLOP/s of large square matrix products on this machine (the MFU denominator): the best of
    1024, 2048 and 4096, two seconds each."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            a @ b
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < 2:
            a @ b
            runs += 1
        best = max(best, 2 * n**3 * runs / (time.perf_counter() - start))
    return best


def mfu_case(work: Path, dtype: str) -> dict:
    """Full fine-tune of the small model with tunesmith. MFU = 6 x non-embedding parameters x tokens/s over the
    measured matmul peak (the usual convention: attention scores and the head's savings are not counted)."""
    import yaml
    from transformers import AutoConfig

    model, data, out = work / "model-small", work / "data", work / f"tunesmith-small-full-{dtype}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = job(model, data, out, dtype == "bf16") | {"finetuning_type": "full", "template": "vanilla",
                                                    "disable_tqdm": True, "data_cache_dir": str(work / "cache"),
                                                    "learning_rate": 1e-5, "allow_slow_bf16": True}
    path = work / f"mfu-{dtype}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_measured([sys.executable, "-m", "tunesmith.cli", "train", str(path)], work / f"mfu-{dtype}.log")
    lines = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    train_time = json.loads((out / "train_results.json").read_text())["train_runtime"]
    rates = [l["tokens_per_s"] for l in lines if "tokens_per_s" in l]
    tokens_per_s = sum(rates) / max(len(rates), 1)
    config = AutoConfig.from_pretrained(model)
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    non_embedding = layers * (4 * hidden * hidden + 3 * hidden * inter)
    peak = matmul_peak(dtype)
    achieved = 6 * non_embedding * tokens_per_s
    return {"case": f"mfu-small-full-{dtype}", "non_embedding_params": non_embedding,
            "tokens_per_s": round(tokens_per_s, 1), "train_s": round(train_time, 1),
            "achieved_tflops": round(achieved / 1e12, 3), "matmul_peak_tflops": round(peak / 1e12, 3),
            "mfu": round(achieved / peak, 3)}


START, END = "<!-- compare_llamafactory:start -->", "<!-- compare_llamafactory:end -->"


def machine_name() -> str:
    """The CPU model and core count: speed ratios differ between CPUs (AMX or not, for one)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return f"{os.cpu_count()} cores, CPU model: {model}, torch threads = cores"


def readme_table(lines: list[dict], machine: str) -> str:
    """The README's performance table, generated from the benchmark's JSON lines."""
    rows = ["| case | params | tunesmith tok/s | LLaMA-Factory tok/s | speed-up | tunesmith RSS | LLaMA-Factory RSS "
            "| RSS ratio | eval loss (ts / LF) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in lines:
        if "tunesmith" in r:
            ts, lf = r["tunesmith"], r["llamafactory"]
            rows.append(f"| {r['case']} | {r['params'] / 1e6:.1f}M | {ts['supervised_tokens_per_s']:.0f} | "
                        f"{lf['supervised_tokens_per_s']:.0f} | {r['speedup_tokens_per_s']:.2f}x | "
                        f"{ts['peak_rss_mb']} MB | {lf['peak_rss_mb']} MB | {r['rss_ratio']:.2f} | "
                        f"{ts['final_eval_loss']:.4f} / {lf['final_eval_loss']:.4f} |")
    mfu = [f"- full fine-tune of the small model, {r['case'].rsplit('-', 1)[-1]}: {r['tokens_per_s']:.0f} tokens/s, "
           f"{r['achieved_tflops']:.3f} TFLOP/s of a measured {r['matmul_peak_tflops']:.3f} TFLOP/s matmul peak: "
           f"MFU {100 * r['mfu']:.1f}%" for r in lines if "mfu" in r]
    samples = next((r["samples"] for r in lines if "samples" in r), "?")
    machine = next((r["machine"] for r in lines if "machine" in r and "tunesmith" in r), machine)
    mfu = [line + (f" (measured on {r['machine']})" if r.get("machine", machine) != machine else "")
           for line, r in zip(mfu, [r for r in lines if "mfu" in r])]
    runs = next((r["tunesmith"].get("runs", 1) for r in lines if "tunesmith" in r), 1)
    repeats = f"; each tool run {runs} times per case, alternating: fastest time, highest RSS" if runs > 1 else ""
    return "\n".join([START, f"Measured on {machine}, {samples} synthetic long-tailed samples (10% held out), "
                       "supervised tokens/s over each tool's own training time; tunesmith with "
                       "`parallel_passes: 2` and `max_tokens_per_forward: 1536` (fp32) or 2048 (bf16), "
                       f"LLaMA-Factory with its defaults{repeats}:", "", *rows, "",
                       *mfu, END])


def write_readme(lines: list[dict], machine: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + readme_table(lines, machine) + rest.split(END, 1)[1]
        readme.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and case; the fastest counts")
    parser.add_argument("--no-mfu", action="store_true")
    parser.add_argument("--only-mfu", action="store_true")
    parser.add_argument("--work", default=str(BENCH / "compare"))
    parser.add_argument("--readme", metavar="JSONL", help="only rewrite the README table from saved JSON lines")
    parser.add_argument("--machine", default=machine_name(), help="for tables of lines that do not name it")
    args = parser.parse_args()
    if args.readme:
        # other libraries may print to stdout (DeepSpeed's accelerator notice): only the JSON lines count
        lines = [json.loads(l) for l in Path(args.readme).read_text().splitlines() if l.startswith("{")]
        write_readme(lines, args.machine)
        return
    lf_cli = ensure_llamafactory()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    build_data(work / "data", args.samples)
    params = {name: build_model(name, work / f"model-{name}") for name in MODELS}
    for name in [] if args.only_mfu else args.models.split(","):
        for dtype in args.dtypes.split(","):
            print(json.dumps({**run_case(name, dtype, work, lf_cli, args.repeats), "params": params[name],
                              "samples": args.samples, "machine": machine_name()}), flush=True)
    if not args.no_mfu:
        for dtype in args.dtypes.split(","):
            print(json.dumps(mfu_case(work, dtype)), flush=True)


if __name__ == "__main__":
    main()
