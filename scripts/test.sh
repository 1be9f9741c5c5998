#!/usr/bin/env bash
# Run the test suite offline, in .venv, with a throw-away HF_HOME.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
HF_HOME="$(mktemp -d)"
export HF_HOME
exec python -m pytest "$@"
