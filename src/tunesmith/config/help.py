"""`--help` text, generated from the config dataclasses so every field is documented once."""

from __future__ import annotations

import typing
from dataclasses import MISSING, fields

from tunesmith.config.fields import ALIASES, GROUPS
from tunesmith.config.loader import _describe


def group_help(group_names: list[str]) -> str:
    reverse_alias: dict[str, list[str]] = {}
    for old, new in ALIASES.items():
        reverse_alias.setdefault(new, []).append(old)
    lines = []
    for name in group_names:
        cls = GROUPS[name]
        lines.append(f"\n{name} — {cls.__doc__.strip()}")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            alias = f" (alias: {', '.join(reverse_alias[f.name])})" if f.name in reverse_alias else ""
            lines.append(f"  --{f.name} [{_describe(hints[f.name])}, default {default!r}]{alias}")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)
