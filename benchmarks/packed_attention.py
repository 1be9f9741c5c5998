"""Packed attention on the CPU: forward + backward time per token of tunesmith's per-sample attention.

Cases (8 heads of 64, fp32, one thread per core): a packed row of 8,192 tokens holding 128 samples of 64 tokens,
split once per tensor (tunesmith) and sliced per sample (the earlier code, whose backward adds a full-size
zero-filled gradient per slice); and, as the reference, 8 unpacked rows of 1,024 tokens (one sample each). One
JSON line per case: milliseconds per call and microseconds per token.

    python benchmarks/packed_attention.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tunesmith.model.attention import BOUNDS_KWARG, attention_function, cpu_causal  # noqa: E402
from tunesmith.runtime import describe_cpu  # noqa: E402


def sliced(q, k, v, bounds):  # the earlier code: one slice of each tensor per sample
    pieces = [cpu_causal(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], 0.0, None, False)
              for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(pieces, dim=2)


def timed(fn, rows: int, length: int, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps + 1):
        q, k, v = (torch.randn(rows, 8, length, 64, requires_grad=True) for _ in range(3))
        started = time.perf_counter()
        fn(q, k, v).sum().backward()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    packed = attention_function("cpu")
    short = [64 * i for i in range(129)]
    cases = {
        "packed_128x64_split": (1, 8192, lambda q, k, v: packed(None, q, k, v, None, **{BOUNDS_KWARG: short})[0]),
        "packed_128x64_sliced": (1, 8192, lambda q, k, v: sliced(q, k, v, short)),
        "unpacked_8x1024": (8, 1024, lambda q, k, v: packed(None, q, k, v, None)[0]),
    }
    for name, (rows, length, fn) in cases.items():
        seconds = timed(fn, rows, length)
        print(json.dumps(describe_cpu({"case": name, "ms": round(seconds * 1e3, 1),
                                       "us_per_token": round(seconds * 1e6 / (rows * length), 2),
                                       "date": time.strftime("%Y-%m-%d")})), flush=True)


if __name__ == "__main__":
    main()
