#!/usr/bin/env bash
# Create or reuse .venv and install tunesmith with its test dependencies. Sourced by quickstart.sh and test.sh.
# torch is pinned to the CPU build (2.13.0) unless the venv already has a torch (e.g. a CUDA build you installed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing the CPU build of torch 2.13.0 into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
fi
stamp=".venv/.tunesmith-install-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing tunesmith and its dependencies into .venv (pip install -e '.[dev]'; a few minutes the first time)" >&2
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
  echo "[setup] done; \`source .venv/bin/activate\` puts \`tunesmith\` on your PATH" >&2
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$PWD/.venv/bin:$PATH"
