"""CPU training beside another busy process: how the thread settings hold up.

The quickstart's LoRA sft job (the shipped tiny model, fp32) runs a fixed number of steps in a fresh process,
on an idle machine and beside one competing busy process (a Python spin loop). Settings compared:
`tunesmith` (nothing set: the thread governor of train/cpu_threads.py follows the free cores), `fixed`
(OMP_NUM_THREADS = all cores, the governor off: how tunesmith ran before), `PASSIVE` (OMP_WAIT_POLICY=PASSIVE,
governor off) and `spin:N` (GOMP_SPINCOUNT=N, governor off). One JSON line per case: seconds of training,
steps/s, and the slowdown against the idle run of `fixed`.

    python benchmarks/busy_cpu.py [--steps 40] [--repeats 2] [--policies tunesmith,fixed,PASSIVE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

# Runs the training in-process without the CLI, so the OpenMP policy is whatever the environment says.
JOB = """
import json, sys
from tunesmith.config import load_config
from tunesmith.train.recipe import run
cfg = load_config(sys.argv[1:])
run(cfg, {})
"""


def train_once(steps: int, policy: str, out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    if policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = policy[5:]
        env["OMP_NUM_THREADS"] = str(os.cpu_count())
    elif policy == "fixed":
        env["OMP_NUM_THREADS"] = str(os.cpu_count())
    elif policy != "tunesmith":
        env["OMP_WAIT_POLICY"] = policy
    args = [str(ROOT / "examples/quickstart_sft.yaml"), f"output_dir={out}", "overwrite_output_dir=true",
            f"max_steps={steps}", "bf16=false", "eval_strategy=no", "load_best_model_at_end=false",
            "save_strategy=no", "plot_loss=false", "disable_tqdm=true", "val_size=0"]
    subprocess.run([sys.executable, "-c", JOB, *args], cwd=ROOT, env=env, check=True, capture_output=True)
    return json.loads((out / "train_results.json").read_text())["train_runtime"]


def main() -> None:
    from tunesmith.runtime import describe_cpu

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policies", default="tunesmith,fixed,PASSIVE", help="comma list: default, PASSIVE, spin:N")
    args = parser.parse_args()
    results: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for load in ("idle", "busy"):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                time.sleep(0.5)
                for _ in range(args.repeats):  # alternate the policies; keep each one's fastest run
                    for policy in args.policies.split(","):
                        seconds = train_once(args.steps, policy, Path(tmp) / "o")
                        key = (load, policy)
                        results[key] = min(results.get(key, float("inf")), seconds)
            finally:
                if spinner is not None:
                    spinner.kill()
    for (load, policy), seconds in results.items():
        print(json.dumps(describe_cpu({
            "case": f"{load}_{policy.lower()}", "omp_wait": policy, "competing_busy_processes": int(load == "busy"),
            "steps": args.steps, "train_seconds": round(seconds, 2), "steps_per_s": round(args.steps / seconds, 2),
            "slowdown_vs_idle_fixed": round(seconds / results[("idle", "fixed")], 2),
            "date": time.strftime("%Y-%m-%d")})), flush=True)


if __name__ == "__main__":
    main()
