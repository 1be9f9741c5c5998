#!/usr/bin/env bash
# One self-contained GPU check (under 8 minutes on an H100/H200, no network): bf16 LoRA and full sft on a
# generated ~0.5B model, fp16 with loss scaling, the packed path, a short predict and eval.
# Prints JSON lines (tokens/s, MFU against the card's bf16 peak, peak GPU memory).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! $PY -c "import tunesmith" 2>/dev/null; then
  $PY -m pip install -q --no-deps -e . || export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 $PY benchmarks/gpu_check.py
