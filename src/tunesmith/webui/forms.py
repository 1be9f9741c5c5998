"""The web UI's forms, generated from the config dataclasses (config/fields.py) so that they never drift from
the CLI: one field per config key, with its type, default, choices and help text; and the way back, from form
values to the YAML a command runs, its command line and the validator's messages. No Gradio here."""

from __future__ import annotations

import json
import shlex
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal

import yaml

from tunesmith.config.fields import GROUPS
from tunesmith.config.loader import ConfigError, load_config

Kind = Literal["bool", "int", "float", "text", "choice", "mapping"]


@dataclass(frozen=True)
class FormField:
    group: str
    name: str
    kind: Kind
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    optional: bool = False  # None is allowed (an empty box)


def _kind(tp: Any) -> tuple[Kind, tuple[Any, ...], bool]:
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if literals and len(args) == 2:  # `int | Literal["auto"]`: free text, "auto" or a number
            return "text", (), optional
        tp = args[0] if len(args) == 1 else str
    if typing.get_origin(tp) is Literal:
        return "choice", typing.get_args(tp), optional
    if tp is bool:
        return "bool", (), optional
    if tp is int:
        return "int", (), optional
    if tp is float:
        return "float", (), optional
    if tp in (dict, list) or typing.get_origin(tp) in (dict, list):
        return "mapping", (), optional
    return "text", (), optional


def form_fields(groups: list[str] | None = None) -> list[FormField]:
    """Every config key of `groups` (all by default), in the dataclasses' order."""
    out = []
    for group in groups or list(GROUPS):
        cls = GROUPS[group]
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            kind, choices, optional = _kind(hints[f.name])
            out.append(FormField(group, f.name, kind, default, f.metadata.get("help", ""), choices, optional))
    return out


def to_settings(values: dict[str, Any], fields_: list[FormField]) -> dict[str, Any]:
    """Form values -> the settings that differ from the defaults (empty boxes of optional keys mean None)."""
    by_name = {f.name: f for f in fields_}
    out = {}
    for name, value in values.items():
        f = by_name.get(name)
        if f is None:
            continue
        if isinstance(value, str):
            value = value.strip()
            if value == "" and (f.optional or f.default is None):
                value = None
            elif f.kind == "mapping":
                value = json.loads(value) if value else {}
            elif f.kind == "bool" and value.lower() in ("true", "false"):
                value = value.lower() == "true"
        if f.kind in ("int", "float") and value is not None and not isinstance(value, str):
            value = int(value) if f.kind == "int" and float(value).is_integer() else value
        if value != f.default:
            out[name] = value
    return out


def settings_yaml(settings: dict[str, Any]) -> str:
    return yaml.safe_dump(settings, sort_keys=False, allow_unicode=True) if settings else "{}\n"


def command_args(settings: dict[str, Any]) -> list[str]:
    """The settings as `key=value` arguments (mappings and lists as JSON)."""
    def text(value: Any) -> str:
        return json.dumps(value) if isinstance(value, (dict, list)) else ("null" if value is None else str(value))
    return [f"{key}={text(value)}" for key, value in settings.items()]


def command_line(command: str, settings: dict[str, Any]) -> str:
    """The same as a shell command line."""
    return shlex.join(["tunesmith", command, *command_args(settings)])


def problems(settings: dict[str, Any], check: Any = None) -> list[str]:
    """What the config loader (types, names) and `check(cfg)` (the command's validator) say of the settings."""
    try:
        cfg = load_config(command_args({k: v for k, v in settings.items() if v is not None}))
    except ConfigError as err:
        return list(err.problems)
    if check is None:
        return []
    try:
        check(cfg)
    except ConfigError as err:
        return list(err.problems)
    return []


def problems_by_field(found: list[str], names: list[str]) -> dict[str, list[str]]:
    """Each problem under the config keys it names (`key` in backticks), for messages beside the fields."""
    import re

    known, out = set(names), {}
    for problem in found:
        for key in dict.fromkeys(re.findall(r"`([a-z_0-9]+)`", problem)):
            if key in known:
                out.setdefault(key, []).append(problem)
    return out
