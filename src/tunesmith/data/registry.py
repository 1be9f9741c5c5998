"""dataset_info.json: dataset names -> where the rows are and how their columns map (LLaMA-Factory's schema)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.errors import DataError

FORMATS = ("alpaca", "sharegpt", "openai")
COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected",
               "text", "kto_tag", "reasoning", "images", "videos", "audios"}
TAG_KEYS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag",
            "reasoning_tag"}
ENTRY_KEYS = {"file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "formatting",
              "ranking", "subset", "split", "folder", "num_samples", "columns", "tags", "load_from"}

DEFAULT_TAGS = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
                 "reasoning_tag": "reasoning_content"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system",
               "reasoning_tag": "reasoning_content"},
}


@dataclass
class DatasetSpec:
    name: str
    file_name: str | None = None
    hf_hub_url: str | None = None
    formatting: str = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    base_dir: Path = Path(".")

    def column(self, key: str, default: str | None = None) -> str | None:
        return self.columns.get(key, default)

    def tag(self, key: str) -> str:
        return self.tags.get(key, DEFAULT_TAGS["openai" if self.formatting == "openai" else "sharegpt"][key])

    @property
    def where(self) -> str:
        return str(self.base_dir / self.file_name) if self.file_name else f"hub dataset {self.hf_hub_url}"


def load_registry(dataset_dir: str) -> dict[str, dict[str, Any]]:
    path = Path(dataset_dir) / "dataset_info.json"
    if not Path(dataset_dir).is_dir():
        raise DataError(f"dataset_dir `{dataset_dir}` does not exist", fix="set `dataset_dir` to the folder that "
                        "holds dataset_info.json")
    if not path.is_file():
        raise DataError(f"no dataset_info.json in `{dataset_dir}`", file=str(path),
                        fix="create it (see data/dataset_info.json in tunesmith for the schema)")
    data = path.read_bytes()
    try:
        registry = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"not UTF-8 text: byte 0x{data[err.start]:02x} at line {line}", file=str(path), row=line,
                        fix="save dataset_info.json as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", file=str(path)) from None
    if not isinstance(registry, dict):
        raise DataError("expected an object mapping dataset names to entries", file=str(path))
    return registry


def resolve(names: str, dataset_dir: str) -> list[DatasetSpec]:
    """'a,b' -> [DatasetSpec, DatasetSpec], every entry checked against the schema."""
    registry = load_registry(dataset_dir)
    info_path = str(Path(dataset_dir) / "dataset_info.json")
    specs = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in registry:
            known = ", ".join(sorted(registry)) or "(none)"
            raise DataError(f"unknown dataset `{name}`", file=info_path,
                            fix=f"use one of: {known}; or add an entry for `{name}`")
        specs.append(_parse_entry(name, registry[name], Path(dataset_dir), info_path))
    return specs


def _parse_entry(name: str, entry: Any, base_dir: Path, info_path: str) -> DatasetSpec:
    def bad(msg: str, fix: str | None = None) -> DataError:
        return DataError(msg, file=info_path, field=name, fix=fix, reason="bad registry")

    if not isinstance(entry, dict):
        raise bad("an entry must be an object such as {\"file_name\": \"my_data.json\"}")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise bad(f"unknown entry key(s) {sorted(unknown)}", fix=f"valid keys: {', '.join(sorted(ENTRY_KEYS))}")
    if not entry.get("file_name") and not entry.get("hf_hub_url"):
        if entry.get("ms_hub_url") or entry.get("script_url") or entry.get("om_hub_url"):
            raise bad("only `file_name` and `hf_hub_url` sources are supported")
        raise bad("needs `file_name` (a file or folder in dataset_dir) or `hf_hub_url`")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise bad(f"unknown formatting `{formatting}`", fix=f"use one of {', '.join(FORMATS)}")
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    if not isinstance(columns, dict) or set(columns) - COLUMN_KEYS:
        raise bad(f"unknown column key(s) {sorted(set(columns) - COLUMN_KEYS) if isinstance(columns, dict) else columns}",
                  fix=f"`columns` maps these keys to your column names: {', '.join(sorted(COLUMN_KEYS))}")
    if not isinstance(tags, dict) or set(tags) - TAG_KEYS:
        raise bad(f"unknown tag key(s) {sorted(set(tags) - TAG_KEYS) if isinstance(tags, dict) else tags}",
                  fix=f"`tags` maps these keys to your values: {', '.join(sorted(TAG_KEYS))}")
    unsupported = {"images", "videos", "audios"} & set(columns)
    if unsupported:
        raise bad(f"columns {sorted(unsupported)} are not supported yet (text-only models)")
    return DatasetSpec(name=name, file_name=entry.get("file_name"), hf_hub_url=entry.get("hf_hub_url"),
                       formatting=formatting, ranking=bool(entry.get("ranking", False)), subset=entry.get("subset"),
                       split=entry.get("split", "train"), folder=entry.get("folder"),
                       num_samples=entry.get("num_samples"), columns=dict(columns), tags=dict(tags),
                       base_dir=base_dir)
