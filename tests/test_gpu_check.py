"""The GPU check script itself, in its CPU smoke mode: every step runs and asserts, and the summary is green."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_and_passes():
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    lines = [json.loads(l) for l in done.stdout.splitlines() if l.startswith("{")]
    checks = {l["check"]: l for l in lines}
    assert done.returncode == 0, done.stdout[-3000:]
    for name in ("sft-lora-packing-ckpt", "sft-full-packing", "sft-full-fsdp", "dpo-lora", "kto-lora", "grpo-lora", "resume",
                 "predict-hf"):
        assert checks[name]["ok"] is True, checks[name]
    assert checks["summary"] == {"check": "summary", "ok": True, "failed": []}
