"""The process around a command: logging, foreign warnings, and what this CPU computes fast. `prepare_process`
runs before the command's modules (and torch) load."""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
import warnings
from typing import Any

from tunesmith.config import Config

log = logging.getLogger("tunesmith")


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        return f"[tunesmith] {text}"


def configure_logging(level_name: str) -> None:
    """tunesmith's own messages to stderr, concise; other ranks than 0 show warnings only."""
    level = {"warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}[level_name]
    if int(os.environ.get("RANK", "0") or 0) > 0:
        level = max(level, logging.WARNING)
    root = logging.getLogger("tunesmith")
    root.handlers = [h for h in root.handlers if not getattr(h, "tunesmith", False)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    handler.tunesmith = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def quiet_foreign_warnings(debug: bool) -> None:
    """Warnings from libraries about their own deprecations or optional backends say nothing to a user of
    tunesmith; `log_level: debug` shows them."""
    if debug:
        return
    if not _has_cuda_driver():  # DeepSpeed otherwise warns on import that it guessed the accelerator
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bar
    for module in ("peft", "deepspeed", "accelerate", "transformers", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    # bitsandbytes tries to fetch an optional CPU kernel from a hub on AVX-512 bf16 CPUs and says so when offline;
    # it falls back to its own kernel
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)


def _has_cuda_driver() -> bool:
    return os.path.exists("/proc/driver/nvidia") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def prepare_process(cfg: Config) -> None:
    configure_logging(cfg.logging.log_level)
    quiet_foreign_warnings(cfg.logging.log_level == "debug")


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _bf16_matmul_ratio() -> float:
    """Time of a bf16 matrix product over an fp32 one of the same shape (the fallback where flags are unknown)."""
    import time

    import torch

    times = []
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(256, 256, dtype=dtype)
        torch.mm(a, a)
        started = time.perf_counter()
        for _ in range(3):
            torch.mm(a, a)
        times.append(time.perf_counter() - started)
    return times[1] / max(times[0], 1e-9)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm); without
    it bf16 matrix products are emulated and far slower than fp32."""
    flags = _cpu_flags()
    if flags is not None and platform.machine().lower() in ("x86_64", "amd64", "i686"):
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    if flags is not None and platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return _bf16_matmul_ratio() < 3.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def use_bf16_on_cpu(wanted: bool, allow_slow: bool, what: str) -> bool:
    """The bf16 decision for a CPU: kept where the CPU computes it natively (or the user insists with
    `allow_slow_bf16`), else fp32 with one warning that names the setting."""
    if not wanted or allow_slow_bf16_ok(allow_slow):
        return wanted
    log.warning("%s: this CPU (%s) has no native bf16 (AVX-512 BF16 or AMX), so bf16 would run far slower "
                "than fp32; computing in fp32 instead. Set `allow_slow_bf16: true` to use bf16 anyway.",
                what, cpu_model())
    return False


def allow_slow_bf16_ok(allow_slow: bool) -> bool:
    return allow_slow or cpu_has_fast_bf16()


def describe_cpu(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The CPU facts recorded with every benchmark figure."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "native_bf16": cpu_has_fast_bf16(), **(extra or {})}
