"""GRPO on this machine: the reward curve of examples/grpo_lora.yaml after examples/sft_arithmetic.yaml.

Runs both examples into a temporary folder (fresh processes, the shipped tiny model), then prints one JSON line
per logged GRPO step (mean reward, each reward function's mean, answer length, KL, answer tokens/s) and a summary
line (seconds of each run, first and last reward, CPU model); the reward plot is copied to
benchmarks/grpo_reward_curve.png.

    python benchmarks/grpo_reward_curve.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def train(config: str, *extra: str) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", config, "disable_tqdm=true", *extra],
                   check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunesmith-grpo-") as work:
        sft, grpo = Path(work) / "sft", Path(work) / "grpo"
        sft_s = train("examples/sft_arithmetic.yaml", f"output_dir={sft}")
        grpo_s = train("examples/grpo_lora.yaml", f"model_name_or_path={sft}", f"output_dir={grpo}",
                       f"max_steps={args.steps}", "save_strategy=no")
        lines = [json.loads(l) for l in (grpo / "trainer_log.jsonl").read_text().splitlines()]
        steps = [l for l in lines if "reward" in l]
        for l in steps:
            print(json.dumps({k: l[k] for k in ("current_steps", "reward", "rewards/regex_format",
                                                "rewards/math_answer", "answer_length", "kl", "answer_tokens_per_s")}))
        shutil.copy(grpo / "training_reward.png", ROOT / "benchmarks" / "grpo_reward_curve.png")
        print(json.dumps({"summary": True, "sft_seconds": round(sft_s, 1), "grpo_seconds": round(grpo_s, 1),
                          "grpo_steps": args.steps, "first_reward": steps[0]["reward"],
                          "last_reward": steps[-1]["reward"], "cpu": cpu_model()}))


if __name__ == "__main__":
    main()
