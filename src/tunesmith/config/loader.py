"""Turn argv (a YAML file, `key=value` overrides, `--flag value` arguments) into a typed Config.

Every problem is collected and reported at once as a ConfigError; nothing here loads a model.
"""

from __future__ import annotations

import difflib
import math
import re
import functools
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml

from tunesmith.config.fields import (ALIAS_VALUES, ALIASES, GROUPS, IGNORED, INVERTED, NOT_SUPPORTED,
                                     NOT_SUPPORTED_PREFIXES, Config)

KEY_VALUE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=")

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


class ConfigError(Exception):
    """One or more config problems; the CLI prints them all and exits with code 2."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def field_index() -> dict[str, tuple[str, Any]]:
    """key -> (group name, dataclass field) for every config key."""
    index = {}
    for group_name, group_cls in GROUPS.items():
        for f in fields(group_cls):
            index[f.name] = (group_name, f)
    return index


def _resolved_type(group_cls: type, name: str) -> Any:
    return typing.get_type_hints(group_cls)[name]


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, from_text: bool) -> Any:
    """Convert `value` to type `tp` or raise ValueError. Text (argv) values are parsed; YAML values are
    checked, with numbers written as strings (`1e-4`, which YAML reads as text) accepted."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        args = typing.get_args(tp)
        if value is None or (from_text and str(value).lower() in {"none", "null"}):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, from_text)
            except ValueError:
                continue
        raise ValueError(f"expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        text = value if not isinstance(value, str) else value.strip()
        if text in choices:
            return text
        if isinstance(text, bool) is False and str(text) in {str(c) for c in choices}:
            return next(c for c in choices if str(c) == str(text))
        raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise ValueError(f"expected a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            # LLaMA-Factory accepts lists for comma keys such as lora_target or dataset.
            if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
                return ",".join(str(v) for v in value)
            raise ValueError(f"expected text, got {value!r}")
        return str(value)
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            try:
                parsed = yaml.safe_load(value)  # YAML flow style also reads JSON
            except yaml.YAMLError:
                parsed = None
            if isinstance(parsed, dict):
                return parsed
        raise ValueError(f"expected a mapping such as {{min_lr_rate: 0.1}}, got {value!r}")
    raise ValueError(f"unsupported field type {tp}")


@functools.lru_cache(maxsize=1)
def llamafactory_keys() -> frozenset[str]:
    from importlib import resources

    text = resources.files("tunesmith.resources").joinpath("llamafactory_keys.txt").read_text("utf-8")
    return frozenset(l.strip() for l in text.splitlines() if l.strip() and not l.startswith("#"))


def suggest(key: str) -> str:
    known = list(field_index()) + list(ALIASES)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def split_argv(argv: list[str], bool_keys: set[str]) -> tuple[list[str], list[tuple[str, str, str]], list[str]]:
    """argv -> (yaml paths, [(key, raw value, where)], problems). `--key value`, `--key=value`, `key=value`,
    and a bare `--bool_key` (true) are understood."""
    yaml_paths, pairs, problems = [], [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            body = token[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
                pairs.append((key.replace("-", "_"), raw, token))
            else:
                key = ALIASES.get(body.replace("-", "_"), body.replace("-", "_"))
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if key in bool_keys and (nxt is None or nxt.lower() not in _TRUE | _FALSE):
                    pairs.append((body.replace("-", "_"), "true", token))
                elif nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                    problems.append(f"`{token}` needs a value")
                else:
                    pairs.append((body.replace("-", "_"), nxt, token))
                    i += 1
        elif KEY_VALUE.match(token):  # `deepspeed=ds.json` is a setting, not a config file
            key, raw = token.split("=", 1)
            pairs.append((key.strip(), raw, token))
        elif token.endswith((".yaml", ".yml", ".json")):
            yaml_paths.append(token)
        else:
            problems.append(f"don't know what to do with `{token}`: give a YAML file, key=value or --key value")
        i += 1
    return yaml_paths, pairs, problems


def read_yaml(path: str) -> tuple[dict[str, Any], list[str]]:
    p = Path(path)
    if not p.is_file():
        return {}, [f"{path}: config file not found"]
    try:
        content = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        return {}, [f"{path}, line {line}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                    "save the file as UTF-8"]
    except yaml.YAMLError as err:
        return {}, [f"{path}: not valid YAML: {err}"]
    if content is None:
        return {}, []
    if not isinstance(content, dict):
        return {}, [f"{path}: expected a mapping of key: value at the top level"]
    return content, []


def build_config(raw: list[tuple[str, Any, str, bool]]) -> Config:
    """[(key, value, where, from_text)] -> Config, applied in order (later wins). Raises ConfigError."""
    index = field_index()
    cfg = Config()
    problems: list[str] = []
    ignored: list[str] = []
    for key, value, where, from_text in raw:
        original = key
        if key in ALIAS_VALUES and isinstance(value, str) and value in ALIAS_VALUES[key]:
            value = ALIAS_VALUES[key][value]
        key = ALIASES.get(key, key)
        if key in IGNORED:
            ignored.append(original)
            continue
        prefix = next((p for p in NOT_SUPPORTED_PREFIXES if key.startswith(p) and key not in index), None)
        if key in NOT_SUPPORTED or prefix:
            why = NOT_SUPPORTED[key] if key in NOT_SUPPORTED else NOT_SUPPORTED_PREFIXES[prefix]  # type: ignore[index]
            problems.append(f"{where}: `{original}` is not supported: {why}; remove it")
            continue
        if key in INVERTED:
            try:
                value, key = not coerce(value, bool, from_text), INVERTED[key]
            except ValueError as err:
                problems.append(f"{where}: `{original}`: {err}")
                continue
        if key not in index and key in llamafactory_keys():
            problems.append(f"{where}: `{original}` is a LLaMA-Factory setting tunesmith does not support yet; "
                            "remove it")
            continue
        if key not in index:
            problems.append(f"{where}: unknown key `{original}`{suggest(original)}")
            continue
        group_name, f = index[key]
        group = getattr(cfg, group_name)
        try:
            setattr(group, key, coerce(value, _resolved_type(type(group), key), from_text))
        except ValueError as err:
            problems.append(f"{where}: `{original}`: {err}")
    if problems:
        raise ConfigError(problems)
    cfg.ignored_keys = sorted(set(ignored))  # type: ignore[attr-defined]
    return cfg


def load_config(argv: list[str]) -> Config:
    """Parse argv (after the subcommand) into a validated-for-types Config."""
    index = field_index()
    bool_keys = {k for k, (g, f) in index.items() if _resolved_type(GROUPS[g], k) is bool}
    yaml_paths, pairs, problems = split_argv(argv, bool_keys)
    raw: list[tuple[str, Any, str, bool]] = []
    for path in yaml_paths:
        content, errs = read_yaml(path)
        problems += errs
        raw += [(str(k), v, path, False) for k, v in content.items()]
    raw += [(k, v, f"argument `{where}`", True) for k, v, where in pairs]
    try:
        cfg = build_config(raw)
    except ConfigError as err:
        raise ConfigError(problems + err.problems) from None
    if problems:
        raise ConfigError(problems)
    given = {ALIASES.get(key, key) for key, *_ in raw}
    if given & PHASES and "do_train" not in given:
        cfg.training.do_train = False  # classic semantics: naming do_eval or do_predict alone does just that
    return cfg


PHASES = {"do_train", "do_eval", "do_predict"}


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, grouped with comments, loadable again by load_config."""
    lines = []
    for name in GROUPS:
        lines.append(f"# {name}")
        group = vars(getattr(cfg, name))
        lines.append(yaml.safe_dump(group, sort_keys=False, allow_unicode=True).rstrip())
    return "\n".join(lines) + "\n"
