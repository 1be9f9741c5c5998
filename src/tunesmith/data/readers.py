"""Read the raw rows of one dataset (json, jsonl, csv, parquet, txt, a folder of them, or a hub dataset),
each with its file and 1-based row number so every later error can point at it."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunesmith.data.errors import DataError
from tunesmith.data.registry import DatasetSpec

SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".txt"}


@dataclass
class RawRow:
    file: str
    row: int
    data: dict[str, Any]


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        # Many "json" files are really JSON lines; try that before failing.
        first = text.lstrip()[:1]
        if first == "{":
            yield from _read_jsonl(path)
            return
        raise DataError(f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", file=str(path),
                        reason="malformed file") from None
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise DataError("expected a JSON list of records", file=str(path), reason="malformed file")
    yield from enumerate(content, start=1)


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, DataError(f"malformed JSON line: {err.msg} at column {err.colno}", file=str(path),
                                        row=number, fix="fix or remove this line", reason="malformed JSON")


def _read_csv(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        for number, record in enumerate(csv.DictReader(handle), start=1):
            yield number, dict(record)


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def _read_txt(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, {"text": line.rstrip("\n")}


READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet,
           ".txt": _read_txt}


def _files(spec: DatasetSpec) -> list[Path]:
    path = spec.base_dir / spec.file_name  # type: ignore[operator]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise DataError(f"folder has no {', '.join(sorted(SUFFIXES))} files", file=str(path), reason="missing file")
        return files
    if not path.exists():
        raise DataError(f"dataset `{spec.name}` points at a path that does not exist", file=str(path),
                        fix=f"check `file_name` of `{spec.name}` in dataset_info.json (relative to dataset_dir)",
                        reason="missing file")
    if path.suffix not in SUFFIXES:
        raise DataError(f"unsupported file type `{path.suffix}`", file=str(path),
                        fix=f"use one of {', '.join(sorted(SUFFIXES))}", reason="unsupported file")
    return [path]


def _read_hub(spec: DatasetSpec) -> Iterator[RawRow]:
    try:
        import datasets

        dataset = datasets.load_dataset(spec.hf_hub_url, name=spec.subset, split=spec.split)
    except Exception as err:  # the hub raises many types; all mean "could not load"
        raise DataError(f"could not load hub dataset `{spec.hf_hub_url}`: {type(err).__name__}: {err}",
                        fix="check the name and that you are online (HF_HUB_OFFLINE unset), or download it and "
                            "use `file_name`", reason="missing file") from None
    for number, record in enumerate(dataset, start=1):
        yield RawRow(spec.hf_hub_url or "", number, record)


def read_rows(spec: DatasetSpec) -> Iterator[RawRow | DataError]:
    """Rows in file order. A malformed line is yielded as a DataError so the caller decides: fail or skip."""
    if not spec.file_name:
        yield from _read_hub(spec)
        return
    for path in _files(spec):
        for number, record in READERS[path.suffix](path):
            if isinstance(record, DataError):
                yield record
            elif not isinstance(record, dict):
                yield DataError(f"expected an object, got {type(record).__name__}", file=str(path), row=number,
                                reason="malformed row")
            else:
                yield RawRow(str(path), number, record)
