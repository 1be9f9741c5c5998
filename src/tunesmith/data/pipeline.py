"""Configured datasets -> encoded train and eval sets, cached on disk, with a report of every row's fate."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import Config
from tunesmith.data.conversation import Conversation
from tunesmith.data.encode import IGNORE, Dropped, Encoded, encode_chat, encode_text
from tunesmith.data.errors import DataError
from tunesmith.data.formats import to_conversation
from tunesmith.data.readers import data_files, read_rows
from tunesmith.data.registry import DatasetSpec, resolve
from tunesmith.data.templates import ChatTemplate

log = logging.getLogger("tunesmith.data")
CACHE_VERSION = 3


@dataclass
class DataReport:
    rows_read: Counter = field(default_factory=Counter)        # per dataset
    rows_bad: Counter = field(default_factory=Counter)         # per reason (on_bad_row: skip)
    samples_dropped: Counter = field(default_factory=Counter)  # per reason (truncation: drop, empty labels, ...)
    truncated: int = 0
    pt_chunks_split: int = 0
    expanded: int = 0  # conversations the template renders as several sequences (one per turn group)
    expansion_sequences: int = 0  # the sequences those added
    expansion_tokens: int = 0  # the tokens those added (beyond each conversation's longest sequence)

    def to_dict(self) -> dict[str, Any]:
        return {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataReport":
        return cls(**{k: Counter(v) if isinstance(v, dict) else v for k, v in d.items()})


class EncodedSet:
    """Variable-length samples stored flat: sample i is ids[offsets[i]:offsets[i+1]]."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets

    @classmethod
    def from_samples(cls, samples: list[Encoded]) -> "EncodedSet":
        lengths = [len(s.input_ids) for s in samples]
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for s in samples for t in s.input_ids), dtype=np.int32, count=int(offsets[-1]))
        labels = np.fromiter((t for s in samples for t in s.labels), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, labels, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def supervised_tokens(self) -> int:
        # a label at position 0 of a sample has no preceding token to predict it from
        first = self.offsets[:-1][self.lengths > 0]
        return int((self.labels != IGNORE).sum() - (self.labels[first] != IGNORE).sum())

    def save(self, path: Path) -> None:
        np.savez(path, input_ids=self.input_ids, labels=self.labels, offsets=self.offsets)

    @classmethod
    def load(cls, path: Path, split: str = "train") -> "EncodedSet":
        with np.load(path) as data:
            return cls(data["input_ids"], data["labels"], data["offsets"])


@dataclass
class Datasets:
    train: EncodedSet  # or EncodedPairs (data kind `pairs`), EncodedFeedback (`feedback`)
    eval: EncodedSet | None
    report: DataReport
    train_conversations: list[Conversation] | None = None  # only when freshly built (not from cache)
    cache_path: Path | None = None


def load_conversations(specs: list[DatasetSpec], cfg: Config, report: DataReport, rows: str,
                       allow_unanswered: bool = False) -> list[list[Conversation]]:
    """Each dataset's rows as `rows` (a stage's data kind: text, chat or pairs), bad rows raised or counted."""
    per_dataset = []
    for spec in specs:
        conversations, limit = [], cfg.data.max_samples
        for raw in read_rows(spec):
            if limit is not None and report.rows_read[spec.name] >= limit:
                break
            report.rows_read[spec.name] += 1
            try:
                if isinstance(raw, DataError):
                    raise raw
                conversations.append(to_conversation(spec, raw, rows, allow_unanswered))
            except DataError as err:
                if cfg.data.on_bad_row == "error" or err.reason in ("bad registry", "missing file"):
                    if cfg.data.on_bad_row == "error" and err.row is not None:
                        err.fix = (err.fix + "; " if err.fix else "") + "or set `on_bad_row: skip` to skip bad rows"
                    raise
                report.rows_bad[err.reason] += 1
                if report.rows_bad[err.reason] <= 3:
                    log.warning("skipped: %s", err)
        if spec.num_samples is not None:
            rng = random.Random(cfg.training.seed)
            n = spec.num_samples
            conversations = (rng.sample(conversations, n) if n <= len(conversations)
                             else conversations + rng.choices(conversations, k=n - len(conversations)))
        if not conversations:
            raise DataError(f"dataset `{spec.name}` has no usable rows", file=spec.where, reason="empty dataset")
        per_dataset.append(conversations)
    return per_dataset


def mix(parts: list[list[Any]], strategy: str, probs: str | None, seed: int) -> list[Any]:
    if len(parts) == 1 or strategy == "concat":
        return [c for part in parts for c in part]
    weights = [float(p) for p in probs.split(",")] if probs else [1.0] * len(parts)
    if len(weights) != len(parts):
        raise DataError(f"`interleave_probs` has {len(weights)} weights for {len(parts)} datasets")
    rng, pos, exhausted, out = random.Random(seed), [0] * len(parts), set(), []
    while True:
        k = rng.choices(range(len(parts)), weights=weights)[0]
        if pos[k] == len(parts[k]):
            exhausted.add(k)
            if strategy == "interleave_under" or len(exhausted) == len(parts):
                return out
            pos[k] = 0  # over-sampling: start this dataset again
        out.append(parts[k][pos[k]])
        pos[k] += 1


def split_eval(items: list[Any], val_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    n_eval = int(val_size) if val_size >= 1 else int(round(len(items) * val_size))
    if n_eval >= len(items):
        raise DataError(f"`val_size` {val_size} leaves no training data ({len(items)} samples)")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in eval_idx], [items[i] for i in sorted(eval_idx)]


def encode_all(conversations: list[Conversation], cfg: Config, tokenizer: Any, template: ChatTemplate | None,
               report: DataReport, rows: str, split: str) -> Any:
    if rows == "pairs":
        return encode_all_pairs(conversations, cfg, tokenizer, template, report, split)
    if rows == "feedback":
        from tunesmith.data.feedback import encode_all_feedback

        return encode_all_feedback(conversations, cfg, tokenizer, template, report, split)
    if rows == "prompts":
        from tunesmith.data.prompts import encode_all_prompts

        return encode_all_prompts(conversations, cfg, tokenizer, template, report, split)
    d, samples = cfg.data, []
    for conv in conversations:
        try:
            if conv.text is not None:
                chunks = encode_text(conv.text, tokenizer, d.cutoff_len)
                report.pt_chunks_split += len(chunks) - 1 if len(chunks) > 1 else 0
                samples += chunks
                continue
            samples += encode_conversation(conv, template, tokenizer, d, report)
        except Dropped as drop:
            report.samples_dropped[drop.reason] += 1
        except DataError as err:  # the template refused the conversation
            if d.on_bad_row == "error":
                raise
            report.rows_bad[err.reason] += 1
    if not samples:
        raise DataError("no samples left after encoding: " + ", ".join(
            f"{n} {reason}" for reason, n in report.samples_dropped.items()), fix="raise `cutoff_len` or check the data")
    return EncodedSet.from_samples(samples)


def encode_conversation(conv: Conversation, template: Any, tokenizer: Any, d: Any, report: DataReport) -> list:
    """A chat's sequences, encoded (with mask_history only the one holding the last turn, as it trains alone)."""
    sequences = template.render_chat(conv)
    if d.mask_history:
        sequences = sequences[-1:]
    encoded = []
    for rendered in sequences:
        try:
            encoded.append(encode_chat(rendered, tokenizer, d.cutoff_len, d.train_on_prompt, d.mask_history,
                                       d.truncation))
        except Dropped as drop:
            if len(sequences) == 1:
                raise
            report.samples_dropped[drop.reason] += 1
    report.truncated += sum(e.truncated for e in encoded)
    if len(sequences) > 1:
        lengths = [len(e.input_ids) for e in encoded]
        report.expanded += 1
        report.expansion_sequences += len(sequences) - 1
        report.expansion_tokens += sum(lengths) - max(lengths, default=0)
    return encoded


def encode_all_pairs(conversations: list[Conversation], cfg: Config, tokenizer: Any, template: Any,
                     report: DataReport, split: str) -> Any:
    from tunesmith.data.pairs import EncodedPairs, encode_pairs

    chosen, rejected, _ = encode_pairs(conversations, template, tokenizer, cfg.data, report, "preference pairs")
    return EncodedPairs(EncodedSet.from_samples(chosen), EncodedSet.from_samples(rejected), split)


def _fingerprint(cfg: Config, tokenizer: Any, template: ChatTemplate | None, rows: str) -> str:
    def files_of(names: str | None) -> list[Any]:
        if not names:
            return []
        stats = []
        for spec in resolve(names, cfg.data.dataset_dir):
            if spec.file_name:
                for p in data_files(spec):
                    st = p.stat()
                    stats.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
            stats.append(vars(spec) | {"base_dir": str(spec.base_dir)})
        return stats

    backend = getattr(tokenizer, "backend_tokenizer", None)
    key = {
        "version": CACHE_VERSION,
        "data": {k: v for k, v in vars(cfg.data).items() if k not in ("overwrite_cache", "data_cache_dir",
                                                                       "preprocessing_num_workers", "packing")},
        "rows": rows, "seed": cfg.training.seed,
        "files": files_of(cfg.data.dataset), "eval_files": files_of(cfg.data.eval_dataset),
        "tokenizer": hashlib.sha256((backend.to_str() if backend else str(tokenizer.get_vocab())).encode()).hexdigest(),
        "template": template.jinja if template else None,
        "system": template.default_system if template else None,
        "template_kwargs": template.kwargs if template else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_root(cfg: Config) -> Path:
    if cfg.data.data_cache_dir:
        return Path(cfg.data.data_cache_dir)
    return Path(os.path.expanduser("~/.cache/tunesmith/data"))


def build_datasets(cfg: Config, tokenizer: Any, template: ChatTemplate | None, rows: str,
                   use_cache: bool = True) -> Datasets:
    """Everything configured, encoded as `rows` asks (text, chat or pairs: the stage's data kind); from the cache
    when the inputs have not changed."""
    cache_dir = cache_root(cfg) / _fingerprint(cfg, tokenizer, template, rows)
    if use_cache and not cfg.data.overwrite_cache and (cache_dir / "meta.json").is_file():
        meta = json.loads((cache_dir / "meta.json").read_text())
        kind: Any = EncodedSet
        if rows == "pairs":
            from tunesmith.data.pairs import EncodedPairs as kind
        elif rows == "feedback":
            from tunesmith.data.feedback import EncodedFeedback as kind
        elif rows == "prompts":
            from tunesmith.data.prompts import EncodedPrompts as kind
        eval_set = kind.load(cache_dir / "eval.npz", "eval") if meta["has_eval"] else None
        log.info("loaded tokenized data from cache %s", cache_dir)
        return Datasets(kind.load(cache_dir / "train.npz", "train"), eval_set, DataReport.from_dict(meta["report"]),
                        cache_path=cache_dir)
    report = DataReport()
    seed = cfg.training.seed
    train_convs = mix(load_conversations(resolve(cfg.data.dataset or "", cfg.data.dataset_dir), cfg, report, rows),
                      cfg.data.mix_strategy, cfg.data.interleave_probs, seed)
    eval_convs: list[Conversation] = []
    if cfg.data.eval_dataset:
        eval_convs = mix(load_conversations(resolve(cfg.data.eval_dataset, cfg.data.dataset_dir), cfg, report, rows),
                         cfg.data.mix_strategy, cfg.data.interleave_probs, seed)
    elif cfg.data.val_size > 0:
        train_convs, eval_convs = split_eval(train_convs, cfg.data.val_size, seed)
    train = encode_all(train_convs, cfg, tokenizer, template, report, rows, "train")
    eval_set = encode_all(eval_convs, cfg, tokenizer, template, report, rows, "eval") if eval_convs else None
    if use_cache:
        _write_cache(cache_dir, train, eval_set, report)
    return Datasets(train, eval_set, report, train_conversations=train_convs, cache_path=cache_dir)


def _write_cache(cache_dir: Path, train: Any, eval_set: Any, report: DataReport) -> None:
    """Write to a temporary folder and rename, so a killed run never leaves a half cache that looks complete."""
    tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    train.save(tmp / "train.npz")
    if eval_set is not None:
        eval_set.save(tmp / "eval.npz")
    meta = {"has_eval": eval_set is not None, "report": report.to_dict()}
    (tmp / "meta.json").write_text(json.dumps(meta))
    if cache_dir.exists():
        import shutil

        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
