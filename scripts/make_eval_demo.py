"""Regenerate the demo evaluation tasks in evaluation/ deterministically: `python scripts/make_eval_demo.py`.

mmlu_demo is in the MMLU layout (no header), ceval_demo in the C-Eval layout (header; its test split has no
answers, as in the real benchmark). The questions are written by this script.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from make_demo_data import COUNTRIES, WORDS

OUT = Path(__file__).resolve().parent.parent / "evaluation"
SPLITS = {"dev": 5, "val": 30, "test": 20}


def options(rng: random.Random, right: str, pool: list[str]) -> tuple[list[str], str]:
    wrong = rng.sample([p for p in pool if p != right], 3)
    choices = wrong + [right]
    rng.shuffle(choices)
    return choices, "ABCD"[choices.index(right)]


def arithmetic(rng: random.Random, zh: bool) -> tuple[str, list[str], str]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    right = a + b
    pool = [str(right + d) for d in (-10, -2, -1, 1, 2, 10, 11)] + [str(right)]
    choices, answer = options(rng, str(right), pool)
    return (f"{a}加{b}等于多少？" if zh else f"What is {a} plus {b}?"), choices, answer


def capitals(rng: random.Random, zh: bool) -> tuple[str, list[str], str]:
    country, capital, country_zh, capital_zh = rng.choice(COUNTRIES)
    pool = [c[3] if zh else c[1] for c in COUNTRIES]
    choices, answer = options(rng, capital_zh if zh else capital, pool)
    return (f"{country_zh}的首都是哪里？" if zh else f"What is the capital of {country}?"), choices, answer


def backwards(rng: random.Random, zh: bool) -> tuple[str, list[str], str]:
    word = rng.choice(WORDS)
    pool = [w[::-1] for w in WORDS]
    choices, answer = options(rng, word[::-1], pool)
    return f"Which is the word '{word}' spelled backwards?", choices, answer


def write_mmlu(folder: Path, subjects: dict) -> None:
    for split, n in SPLITS.items():
        (folder / "data" / split).mkdir(parents=True, exist_ok=True)
        for name, (make, seed) in subjects.items():
            rng = random.Random(f"{seed}-{split}")
            with open(folder / "data" / split / f"{name}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                for _ in range(n):
                    q, choices, answer = make(rng, False)
                    csv.writer(f).writerow([q, *choices, answer])


def write_ceval(folder: Path, subjects: dict) -> None:
    for split, n in SPLITS.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        for name, (make, seed) in subjects.items():
            rng = random.Random(f"{seed}-{split}")
            with open(folder / split / f"{name}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
                for i in range(n):
                    q, choices, answer = make(rng, True)
                    writer.writerow([i, q, *choices, "" if split == "test" else answer, ""])


def main() -> None:
    mmlu = {"elementary_arithmetic": (arithmetic, 1), "world_capitals": (capitals, 2), "word_games": (backwards, 3)}
    write_mmlu(OUT / "mmlu_demo", mmlu)
    (OUT / "mmlu_demo" / "mapping.json").write_text(json.dumps({
        "elementary_arithmetic": {"name": "elementary arithmetic", "category": "STEM"},
        "world_capitals": {"name": "world capitals", "category": "Social Sciences"},
        "word_games": {"name": "word games", "category": "Humanities"}}, indent=1) + "\n")
    ceval = {"arithmetic": (arithmetic, 4), "capitals": (capitals, 5)}
    write_ceval(OUT / "ceval_demo", ceval)
    (OUT / "ceval_demo" / "mapping.json").write_text(json.dumps({
        "arithmetic": {"name": "算术", "category": "STEM"},
        "capitals": {"name": "地理", "category": "Social Science"}}, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote demo tasks to {OUT}")


if __name__ == "__main__":
    main()
