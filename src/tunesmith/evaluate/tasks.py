"""Multiple-choice task folders in the layouts users download (MMLU, C-Eval, CMMLU), recognised from the files.

MMLU:  [data/]{dev,val,test}/<subject>_{dev,val,test}.csv, no header: question,A,B,C,D,answer
C-Eval: {dev,val,test}/<subject>_{dev,val,test}.csv, header id,question,A,B,C,D,answer[,explanation]
CMMLU: {dev,test}/<subject>.csv, header ,Question,A,B,C,D,Answer
plus an optional mapping.json: {subject: {"name": display name, "category": category}}.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tunesmith.data.errors import DataError

CHOICES = ("A", "B", "C", "D")
SPLIT_DIRS = {"validation": ["val", "validation"], "val": ["val", "validation"], "test": ["test"], "dev": ["dev"]}


@dataclass
class Question:
    id: str
    question: str
    choices: list[str]
    answer: str | None  # None on splits without answers (C-Eval test)
    file: str
    row: int


@dataclass
class Subject:
    name: str
    display: str
    category: str
    questions: list[Question]
    dev: list[Question] = field(default_factory=list)


@lru_cache(maxsize=1)
def shipped_categories() -> dict[str, dict[str, str]]:
    return json.loads(resources.files("tunesmith.resources").joinpath("eval_categories.json").read_text("utf-8"))


def resolve_task(task: str, task_dir: str, split: str) -> tuple[Path, str]:
    """`ceval`, `ceval_validation`, `mytask` or a path -> (folder, split)."""
    candidates = [Path(task), Path(task_dir) / task]
    for folder in candidates:
        if folder.is_dir():
            return folder, split
    base, _, suffix = task.rpartition("_")
    if base and suffix in SPLIT_DIRS:
        for folder in (Path(base), Path(task_dir) / base):
            if folder.is_dir():
                return folder, suffix
    known = sorted(p.name for p in Path(task_dir).iterdir() if p.is_dir()) if Path(task_dir).is_dir() else []
    raise DataError(f"task folder `{task}` not found (looked in `{task_dir}`)",
                    fix=f"set `task_dir` to where your task folders are; found there: {', '.join(known) or 'nothing'}",
                    reason="missing task")


def _split_dir(folder: Path, split: str) -> Path | None:
    for root in (folder / "data", folder):
        for name in SPLIT_DIRS.get(split, [split]):
            if (root / name).is_dir():
                return root / name
    return None


def _read_csv(path: Path) -> list[Question]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    has_header = "question" in header and "a" in header
    if has_header:
        cols = {name: header.index(name) for name in ("question", "a", "b", "c", "d") if name in header}
        answer_col = header.index("answer") if "answer" in header else None
        id_col = header.index("id") if "id" in header else (0 if header[0] == "" else None)
        if len(cols) < 5:
            missing = [c.upper() if len(c) == 1 else c for c in ("question", "a", "b", "c", "d") if c not in cols]
            raise DataError(f"missing column(s) {missing}", file=str(path), row=1,
                            fix="the header must name question, A, B, C, D (and answer)", reason="bad task")
        body, start = rows[1:], 2
    else:
        cols, answer_col, id_col = {"question": 0, "a": 1, "b": 2, "c": 3, "d": 4}, 5, None
        body, start = rows, 1
    questions = []
    for number, row in enumerate(body, start=start):
        if len(row) <= max(cols.values()):
            raise DataError(f"expected at least {max(cols.values()) + 1} columns, got {len(row)}", file=str(path),
                            row=number, fix="each row needs question, A, B, C, D, answer", reason="bad task")
        answer = row[answer_col].strip().upper() if answer_col is not None and answer_col < len(row) else ""
        if answer and answer not in CHOICES:
            raise DataError(f"answer `{row[answer_col]}` is not one of A, B, C, D", file=str(path), row=number,
                            field="answer", reason="bad task")
        qid = row[id_col] if id_col is not None else str(number - start)
        questions.append(Question(qid, row[cols["question"]], [row[cols[c]] for c in "abcd"], answer or None,
                                  str(path), number))
    return questions


def _subject_files(split_dir: Path, split_name: str) -> dict[str, Path]:
    files = {}
    for path in sorted(split_dir.glob("*.csv")):
        stem = path.stem
        for suffix in (f"_{split_name}", "_val", "_validation", "_test", "_dev"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        files[stem] = path
    return files


def load_task(task: str, task_dir: str, split: str, n_shot: int,
              subjects_filter: str | None) -> tuple[str, str, list[Subject]]:
    folder, split = resolve_task(task, task_dir, split)
    split_dir = _split_dir(folder, split)
    if split_dir is None:
        have = sorted({p.name for root in (folder, folder / "data") if root.is_dir() for p in root.iterdir()
                       if p.is_dir() and p.name != "data"})
        raise DataError(f"task `{folder.name}` has no `{split}` split", file=str(folder),
                        fix=f"set `split` to one of: {', '.join(have) or '(none found)'}", reason="missing task")
    files = _subject_files(split_dir, split_dir.name)
    dev_dir = _split_dir(folder, "dev")
    dev_files = _subject_files(dev_dir, "dev") if dev_dir else {}
    if subjects_filter:
        wanted = [s.strip() for s in subjects_filter.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in files]
        if unknown:
            raise DataError(f"unknown subject(s) {unknown} in task `{folder.name}`",
                            fix=f"choose from: {', '.join(sorted(files))}", reason="bad task")
        files = {s: files[s] for s in wanted}
    mapping = _mapping(folder)
    subjects = []
    for name, path in files.items():
        dev = _read_csv(dev_files[name]) if name in dev_files else []
        if n_shot > len(dev):
            where = dev_files.get(name, dev_dir or folder)
            raise DataError(f"`n_shot: {n_shot}` but the dev split of `{name}` has {len(dev)} questions",
                            file=str(where), fix=f"use n_shot <= {len(dev)}", reason="bad task")
        info = mapping.get(name, {})
        subjects.append(Subject(name, info.get("name", name.replace("_", " ")), info.get("category", "Other"),
                                _read_csv(path), dev))
    return folder.name, split, subjects


def _mapping(folder: Path) -> dict[str, dict[str, str]]:
    """mapping.json in the task folder, else the shipped category map of the benchmark of that name."""
    path = folder / "mapping.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON: {err.msg} at line {err.lineno}", file=str(path), reason="bad task") from None
    shipped = shipped_categories()
    for name, categories in shipped.items():
        if folder.name.lower().startswith(name):
            return {s: {"category": c} for s, c in categories.items()}
    return {}
