#!/usr/bin/env bash
# Build llama-cpp-python (for `tunesmith export export_format=gguf --verify` and the GGUF tests) once per machine:
# the wheel is cached in ~/.cache/tunesmith/wheels and installed into .venv. The build compiles llama.cpp for any
# x86-64/ARM CPU (GGML_NATIVE=OFF, so a cached wheel also runs on another CPU); a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
version="$(python -c 'from tunesmith.export_gguf import LLAMA_CPP_PYTHON; print(LLAMA_CPP_PYTHON)')"
if python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null; then
  exit 0
fi
wheels="${HOME}/.cache/tunesmith/wheels"
mkdir -p "$wheels"
if ! ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "[llama.cpp] building llama-cpp-python $version (a few minutes, once per machine)" >&2
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python -w "$wheels" \
    "llama-cpp-python==$version"
fi
pip install -q --disable-pip-version-check "$wheels"/llama_cpp_python-"$version"-*.whl
