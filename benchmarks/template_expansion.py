"""What per-turn sequences cost: tokens of a multi-turn dataset rendered with templates that render history
stably (one sequence per conversation) and with ones that do not (a sequence per turn), full and with
mask_history. Prints one JSON line per template. Usage: python benchmarks/template_expansion.py"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from family_templates import FAMILIES, SPECIAL_TOKENS  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from tunesmith.data.formats import to_conversation  # noqa: E402
from tunesmith.data.pipeline import DataReport, encode_conversation  # noqa: E402
from tunesmith.data.readers import read_rows  # noqa: E402
from tunesmith.data.registry import resolve  # noqa: E402
from tunesmith.data.templates import load_template  # noqa: E402


def main() -> None:
    base = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama")
    base.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    [spec] = resolve("sharegpt_multiturn_demo", str(ROOT / "data"))
    convs = [to_conversation(spec, raw, "chat") for raw in read_rows(spec)]
    for name in ("llama3.1", "hermes3", "qwen3", "mistral", "glm4.5"):
        tok = copy.copy(base)
        tok.chat_template = FAMILIES[name]
        template = load_template("auto", tok)
        for mask_history in (False, True):
            d = SimpleNamespace(mask_history=mask_history, cutoff_len=4096, train_on_prompt=False,
                                truncation="truncate")
            report, started = DataReport(), time.perf_counter()
            samples = [e for c in convs for e in encode_conversation(c, template, tok, d, report)]
            seconds = time.perf_counter() - started
            tokens = sum(len(s.input_ids) for s in samples)
            print(json.dumps({"template_style": name, "mask_history": mask_history, "conversations": len(convs),
                              "sequences": len(samples), "tokens": tokens,
                              "supervised_tokens": sum(l != -100 for s in samples for l in s.labels),
                              "extra_tokens": report.expansion_tokens,
                              "encode_seconds": round(seconds, 3)}))


if __name__ == "__main__":
    main()
