#!/usr/bin/env bash
# The offline quickstart: LoRA-tune the shipped tiny model on the demo data and show the eval loss falling.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
export HF_HOME="${HF_HOME:-$PWD/.cache/hf}"
tunesmith train examples/quickstart_sft.yaml "$@"
python - <<'PY'
import json
lines = [json.loads(l) for l in open("saves/tiny-llama/lora/sft/trainer_log.jsonl")]
evals = [l["eval_loss"] for l in lines if "eval_loss" in l]
print(f"eval_loss: first {evals[0]:.4f} -> last {evals[-1]:.4f} ({100 * (1 - evals[-1] / evals[0]):.1f}% lower)")
PY
