#!/usr/bin/env bash
# The strict GPU check (meant to fit 10 minutes on one H100/H200, no network): see benchmarks/gpu_check.py.
# Exits non-zero when any step fails; prints JSON lines (tokens/s, MFU against the card's bf16 peak, peak GPU
# memory). `bash scripts/gpu_check.sh --smoke` checks the script itself on a CPU with a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! $PY -c "import tunesmith" 2>/dev/null; then
  $PY -m pip install -q --no-deps -e . || export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 560 $PY benchmarks/gpu_check.py "$@"
