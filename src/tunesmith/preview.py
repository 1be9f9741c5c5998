"""`tunesmith data cfg.yaml [--dump FILE.jsonl]`: see exactly what the model will see (the data loaded as
`tunesmith train` loads it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import Config
from tunesmith.config.validate import validate_for_data
from tunesmith.data.encode import IGNORE
from tunesmith.data.pipeline import Datasets, EncodedSet

MARK_OPEN, MARK_CLOSE = "\u00ab", "\u00bb"  # « » around the tokens that carry loss


def show_mask(ids: np.ndarray, labels: np.ndarray, tokenizer: Any) -> str:
    """Decode a sample, wrapping each run of supervised tokens in « »."""
    out, start = [], 0
    trained = labels != IGNORE
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = tokenizer.decode(ids[start:i].tolist(), skip_special_tokens=False)
            out.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if trained[start] else text)
            start = i
    return "".join(out)


def flat_sets(data: Datasets) -> dict[str, EncodedSet]:
    """train/eval sets; preference pairs show as their chosen and rejected sides, feedback (kto) as each sample's
    own answer and its mismatched one (for the KL estimate)."""
    sets: dict[str, Any] = {"train": data.train, **({"eval": data.eval} if data.eval is not None else {})}
    flat = {}
    for name, encoded in sets.items():
        if isinstance(encoded, EncodedSet) or not hasattr(encoded, "chosen"):  # samples, or grpo's prompts
            flat[name] = encoded
        elif hasattr(encoded, "desirable"):
            flat[f"{name}_answers"], flat[f"{name}_mismatched"] = encoded.chosen, encoded.rejected
        else:
            flat[f"{name}_chosen"], flat[f"{name}_rejected"] = encoded.chosen, encoded.rejected
    return flat


def summarize(data: Datasets) -> dict[str, Any]:
    sets = flat_sets(data)
    lengths = np.concatenate([s.lengths for s in sets.values()])
    tokens = int(lengths.sum())
    supervised = sum(s.supervised_tokens() for s in sets.values())
    report = data.report
    return {
        "rows_read": dict(report.rows_read), "rows_read_total": sum(report.rows_read.values()),
        "rows_skipped": dict(report.rows_bad), "samples_dropped": dict(report.samples_dropped),
        "samples": {name: len(s) for name, s in sets.items()},
        "truncated": report.truncated, "pt_documents_split": report.pt_chunks_split,
        "expanded": {"conversations": report.expanded, "extra_sequences": report.expansion_sequences,
                     "extra_tokens": report.expansion_tokens},
        "tokens": tokens, "supervised_tokens": supervised,
        "supervised_share": round(supervised / max(tokens, 1), 4),
        "length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())},
    }


def dump(path: str, sets: dict[str, EncodedSet], tokenizer: Any) -> int:
    tmp = f"{path}.tmp{os.getpid()}"
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for split, encoded in sets.items():
            for i in range(len(encoded)):
                ids, labels = encoded[i]
                handle.write(json.dumps({"split": split, "index": i, "input_ids": ids.tolist(),
                                         "labels": labels.tolist(), "text": tokenizer.decode(ids.tolist())},
                                        ensure_ascii=False) + "\n")
                count += 1
    os.replace(tmp, path)
    return count


def run(cfg: Config, extras: dict[str, Any]) -> int:
    from tunesmith import stages
    from tunesmith.train.data import load_training_data

    validate_for_data(cfg)
    tokenizer, template, data = load_training_data(cfg, stages.get(cfg.finetuning.stage))
    summary = summarize(data)
    print(f"datasets: {cfg.data.dataset}" + (f"  eval: {cfg.data.eval_dataset}" if cfg.data.eval_dataset else ""))
    print(f"template: {template.name if template else '(none: plain text)'}   cutoff_len: {cfg.data.cutoff_len}   "
          f"cache: {data.cache_path}")
    print(f"rows read:     {summary['rows_read_total']}  " + ", ".join(f"{k}={v}" for k, v in summary["rows_read"].items()))
    print(f"rows skipped:  {sum(summary['rows_skipped'].values())}  " +
          ", ".join(f"{k}={v}" for k, v in summary["rows_skipped"].items()))
    print(f"samples kept:  " + ", ".join(f"{k}={v}" for k, v in summary["samples"].items()))
    print(f"dropped:       {sum(summary['samples_dropped'].values())}  " +
          ", ".join(f"{k}={v}" for k, v in summary["samples_dropped"].items()))
    print(f"truncated:     {summary['truncated']}" + (f"   pt documents split into chunks: {summary['pt_documents_split']}"
                                                       if summary["pt_documents_split"] else ""))
    if template is not None:
        forms = template.forms
        print(f"template does: reasoning {forms.reasoning}, tool-call arguments as a {forms.arguments}"
              + (", call ids generated where missing" if forms.needs_ids else "")
              + f", turns end with {forms.end_of_turn or ' / '.join(forms.turn_openers) or '(nothing)'}"
              + ("" if template.enable_thinking else ", reasoning not trained (enable_thinking: false)"))
    if summary["expanded"]["conversations"]:
        e = summary["expanded"]
        print(f"expanded:      {e['conversations']} conversations the template renders differently once later "
              f"turns follow -> {e['extra_sequences']} extra sequences, {e['extra_tokens']} extra tokens")
    p = summary["length_percentiles"]
    print(f"tokens:        {summary['tokens']}  (length p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {p['max']})")
    print(f"supervised:    {summary['supervised_tokens']}  ({100 * summary['supervised_share']:.1f}% of tokens)")
    first = next(iter(flat_sets(data).values()))
    ids, labels = first[0]
    print(f"\nexample (train sample 0, {len(ids)} tokens; loss on the text inside {MARK_OPEN} {MARK_CLOSE}):")
    print(show_mask(ids, labels, tokenizer))
    if extras.get("dump"):
        n = dump(str(extras["dump"]), flat_sets(data), tokenizer)
        print(f"\nwrote {n} encoded samples to {Path(str(extras['dump']))}")
    return 0
