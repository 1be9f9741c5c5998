"""bf16 on this CPU: matrix-product speed against fp32, and what `bf16: true` costs a training job with
tunesmith's fallback (fp32 where the CPU lacks native bf16) and with `allow_slow_bf16: true` (bf16 kept).

    python benchmarks/cpu_bf16.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def matmul_gflops(dtype: object, n: int = 1024, reps: int = 5) -> float:
    import torch

    a = torch.randn(n, n, dtype=dtype)  # type: ignore[arg-type]
    torch.mm(a, a)
    started = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, a)
    return 2 * n**3 * reps / (time.perf_counter() - started) / 1e9


def train_seconds(steps: int, extra: list[str], out: Path) -> float:
    args = ["train", str(ROOT / "examples/quickstart_sft.yaml"), f"output_dir={out}", "overwrite_output_dir=true",
            f"max_steps={steps}", "eval_strategy=no", "load_best_model_at_end=false", "save_strategy=no",
            "plot_loss=false", "disable_tqdm=true", "val_size=0", *extra]
    subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], cwd=ROOT, check=True, capture_output=True)
    return json.loads((out / "train_results.json").read_text())["train_runtime"]


def main() -> None:
    import torch

    from tunesmith.runtime import describe_cpu

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(json.dumps(describe_cpu({"case": "matmul_1024", "fp32_gflops": round(fp32, 1),
                                   "bf16_gflops": round(bf16, 1), "bf16_slowdown": round(fp32 / bf16, 1),
                                   "date": time.strftime("%Y-%m-%d")})), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case, extra in (("fp32", []), ("bf16_fallback", ["bf16=true"]),
                            ("bf16_forced", ["bf16=true", "allow_slow_bf16=true"])):
            seconds = train_seconds(args.steps, extra, Path(tmp) / case)
            print(json.dumps(describe_cpu({"case": f"quickstart_{case}", "steps": args.steps,
                                           "train_seconds": round(seconds, 2),
                                           "date": time.strftime("%Y-%m-%d")})), flush=True)


if __name__ == "__main__":
    main()
