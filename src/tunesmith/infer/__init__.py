"""Generation engines (hf, vllm) shared by predict, chat and serve."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generation:
    text: str
    n_tokens: int
