#!/usr/bin/env bash
# Create or reuse .venv and install tunesmith with its test dependencies. Sourced by quickstart.sh and test.sh.
# torch is pinned to the CPU build (2.13.0) unless the venv already has a torch (e.g. a CUDA build you installed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
fi
stamp=".venv/.tunesmith-install-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$PWD/.venv/bin:$PATH"
