"""Memory per process of FSDP (`fsdp: full_shard`) against data parallelism, on 2 CPU processes (gloo).

A random Llama-shaped model (about 190M parameters, fp32) is trained for 2 full fine-tuning steps by
`tunesmith train` on 2 processes, once with `fsdp=full_shard` and once as plain data parallelism (DDP). Each
process reports the peak resident memory (ru_maxrss) it reached: under DDP every process loads the weights and
keeps whole gradients and AdamW states; under FSDP rank 1 builds on the meta device and each process keeps half
of the weights, gradients and states. One JSON line per (run, rank), then a summary line.

    python benchmarks/fsdp_memory.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
# Loaded into every process (tunesmith's own modules stay unchanged): at exit, each rank writes its peak
# resident memory.
REPORT = """
import atexit, json, os, resource
def _report():
    if "LOCAL_RANK" not in os.environ:  # torchrun's own process
        return
    rank = os.environ["RANK"]
    out = os.environ["FSDP_BENCH_OUT"]
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump({"rank": int(rank), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}, fh)
atexit.register(_report)
"""


def build_model(folder: Path) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(kind: str, model: Path, work: Path) -> list[dict]:
    out = work / kind
    out.mkdir()
    hook = work / "sitecustomize.py"
    hook.write_text(REPORT)
    env = {**os.environ, "FSDP_BENCH_OUT": str(out), "PYTHONPATH": f"{work}:{ROOT / 'src'}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "tunesmith.cli", "train", f"model_name_or_path={model}", f"dataset_dir={ROOT / 'data'}",
            "dataset=alpaca_en_demo", "template=chatml", "cutoff_len=128", "per_device_train_batch_size=2",
            "finetuning_type=full", "max_steps=2", "save_strategy=no", "disable_tqdm=true",
            f"output_dir={out / 'run'}", f"data_cache_dir={work / 'cache'}", "gradient_checkpointing=false",
            "max_tokens_per_forward=0", *(["fsdp=full_shard"] if kind == "fsdp" else [])]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    from tunesmith.runtime import describe_cpu

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = build_model(work / "model")
        results = {}
        for kind in ("ddp", "fsdp"):
            results[kind] = run(kind, work / "model", work)
            for line in results[kind]:
                print(json.dumps({"run": kind, **line, "params": params}), flush=True)
        summary = {"check": "summary", "params": params, "weights_fp32_mb": round(params * 4 / 2**20),
                   **{f"{k}_rank{r}_peak_rss_mb": results[k][r]["peak_rss_mb"] for k in results for r in (0, 1)},
                   "python": platform.python_version(), **describe_cpu()}
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
