"""Read the raw rows of one dataset (json, jsonl, csv, parquet, txt, a folder of them, or a hub dataset),
each with its file and 1-based row number so every later error can point at it."""

from __future__ import annotations

import csv
import io
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


def _not_utf8(path: Path, data: bytes, err: UnicodeDecodeError, line: int | None = None) -> DataError:
    line = line if line is not None else data[: err.start].count(b"\n") + 1
    return DataError(f"not UTF-8 text: byte 0x{data[err.start]:02x} at line {line}", file=str(path), row=line,
                     fix="save the file as UTF-8 (or fix that line)", reason="not UTF-8")


def _decoded(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, data, err) from None


def _lines(path: Path) -> Iterator[tuple[int, str | DataError]]:
    """(1-based line number, text) per line; a line that is not UTF-8 comes as a DataError for that row."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, _not_utf8(path, raw, err, number)


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = _decoded(path)
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
    for number, line in _lines(path):
        if isinstance(line, DataError):
            yield number, line
            continue
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, DataError(f"malformed JSON line: {err.msg} at column {err.colno}", file=str(path),
                                    row=number, fix="fix or remove this line", reason="malformed JSON")


def _read_csv(path: Path) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(_decoded(path), newline=""))
    header = next(reader, None)
    if header is None:
        return
    for number, fields in enumerate(reader, start=1):
        if not fields:
            continue
        if len(fields) != len(header):
            yield number, DataError(f"has {len(fields)} fields where the header has {len(header)} "
                                    f"({', '.join(header)})", file=str(path), row=number,
                                    fix="quote fields that contain commas, or fix the row", reason="ragged CSV row")
            continue
        yield number, dict(zip(header, fields))


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def _read_txt(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in _lines(path):
        if isinstance(line, DataError):
            yield number, line
        elif line.strip():
            yield number, {"text": line.rstrip("\r\n")}


READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet,
           ".txt": _read_txt}


def data_files(spec: DatasetSpec) -> list[Path]:
    """The files a local dataset reads, in order; a broken symbolic link among them is an error."""
    path = spec.base_dir / spec.file_name  # type: ignore[operator]
    if path.is_dir():
        broken = sorted(p for p in path.rglob("*") if p.is_symlink() and not p.exists())
        if broken:
            raise DataError(f"is a symbolic link to `{broken[0].readlink()}`, which does not exist",
                            file=str(broken[0]), fix="remove the link or restore its target", reason="missing file")
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
    for path in data_files(spec):
        for number, record in READERS[path.suffix](path):
            if isinstance(record, DataError):
                yield record
            elif not isinstance(record, dict):
                yield DataError(f"expected an object, got {type(record).__name__}", file=str(path), row=number,
                                reason="malformed row")
            else:
                yield RawRow(str(path), number, record)
