"""Reward functions of stage grpo: built-ins by name, or a user's Python callable named `module:function`.

Every reward function is called once per batch of rollouts as

    fn(prompts: list[str], completions: list[str], answers: list[str | None], **columns) -> list[float]

with one entry per completion (a prompt's `num_generations` completions follow each other; `columns` holds each
dataset column as a list aligned with the completions, TRL's convention). Built-ins:

- `exact_match`: 1 when the completion, stripped, equals the reference answer, stripped; else 0;
- `math_answer`: 1 when the completion's final number (after `####` if there is one, else its last number)
  equals the reference answer's (same rule), else 0;
- `regex_format`: 1 when `reward_regex` matches the completion (re.search, DOTALL), else 0;
- `length_penalty`: minus the completion's share of `max_new_tokens` (from 0 to -1), for shorter answers.

A function that raises, returns something else than one number per completion, or a NaN stops the run with
its name and the sample it failed on.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any, Callable

from tunesmith.errors import StopError

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def final_number(text: str | None) -> float | None:
    if not text:
        return None
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact_match(prompts: list[str], completions: list[str], answers: list[str | None], **_: Any) -> list[float]:
    return [float(a is not None and c.strip() == a.strip()) for c, a in zip(completions, answers)]


def math_answer(prompts: list[str], completions: list[str], answers: list[str | None], **_: Any) -> list[float]:
    out = []
    for c, a in zip(completions, answers):
        got, want = final_number(c), final_number(a)
        out.append(float(got is not None and want is not None and math.isclose(got, want, abs_tol=1e-6)))
    return out


def make_regex_format(pattern: str) -> Callable[..., list[float]]:
    compiled = re.compile(pattern, re.DOTALL)

    def regex_format(prompts: list[str], completions: list[str], answers: list[str | None], **_: Any) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]
    return regex_format


def make_length_penalty(max_tokens: int, count: Callable[[str], int]) -> Callable[..., list[float]]:
    def length_penalty(prompts: list[str], completions: list[str], answers: list[str | None], **_: Any) -> list[float]:
        return [-min(1.0, count(c) / max(max_tokens, 1)) for c in completions]
    return length_penalty


BUILTIN = ("exact_match", "math_answer", "regex_format", "length_penalty")


def check_names(names: str, weights: str | None, regex: str | None) -> list[str]:
    """Config problems of `reward_funcs` / `reward_weights` / `reward_regex` (no imports of user code)."""
    funcs = [n.strip() for n in names.split(",") if n.strip()]
    problems = []
    if not funcs:
        problems.append("`reward_funcs` names no reward function: use built-ins (" + ", ".join(BUILTIN)
                        + ") or `module:function`")
    for name in funcs:
        if name not in BUILTIN and ":" not in name:
            problems.append(f"reward function `{name}` is neither a built-in ({', '.join(BUILTIN)}) nor "
                            "`module:function`")
    if weights is not None:
        parts = [w.strip() for w in str(weights).split(",")]
        try:
            [float(w) for w in parts]
        except ValueError:
            problems.append(f"`reward_weights` must be numbers separated by commas, got {weights!r}")
        else:
            if len(parts) != len(funcs):
                problems.append(f"`reward_weights` has {len(parts)} weights for {len(funcs)} reward functions")
    if "regex_format" in funcs:
        try:
            re.compile(regex or "")
        except re.error as err:
            problems.append(f"`reward_regex` is not a valid regular expression: {err}")
    return problems


def load_reward_funcs(names: str, weights: str | None, regex: str, max_tokens: int,
                      count: Callable[[str], int]) -> list[tuple[str, Callable[..., Any], float]]:
    """(name, function, weight) of each configured reward function."""
    funcs = [n.strip() for n in names.split(",") if n.strip()]
    scale = [float(w) for w in str(weights).split(",")] if weights is not None else [1.0] * len(funcs)
    out = []
    for name, weight in zip(funcs, scale):
        if name == "regex_format":
            fn: Callable[..., Any] = make_regex_format(regex)
        elif name == "length_penalty":
            fn = make_length_penalty(max_tokens, count)
        elif name in BUILTIN:
            fn = globals()[name]
        else:
            fn = _import(name)
        out.append((name, fn, weight))
    return out


def _import(name: str) -> Callable[..., Any]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise StopError(f"reward function `{name}`: cannot import `{module_name}` ({err}); put the module on "
                        "PYTHONPATH or in the folder you run tunesmith from", exit_code=2) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise StopError(f"reward function `{name}`: `{module_name}` has no callable `{attr}`", exit_code=2)
    return fn


def score(funcs: list[tuple[str, Callable[..., Any], float]], prompts: list[str], completions: list[str],
          answers: list[str | None], columns: dict[str, list[Any]]) -> dict[str, list[float]]:
    """Each function's rewards per completion, checked."""
    out = {}
    for name, fn, _ in funcs:
        try:
            values = fn(prompts=prompts, completions=completions, answers=answers, **columns)
        except Exception as err:  # noqa: BLE001 - a user function's failure is reported with its sample
            raise StopError(f"reward function `{name}` raised {type(err).__name__}: {err}\n  on the batch whose first "
                            f"completion is {completions[0][:200]!r} (prompt {prompts[0][-200:]!r})") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise StopError(f"reward function `{name}` returned {type(values).__name__}"
                            + (f" of length {len(values)}" if hasattr(values, "__len__") else "")
                            + f"; it must return one number per completion ({len(completions)})")
        for k, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
                raise StopError(f"reward function `{name}` returned {v!r} for completion {completions[k][:200]!r} "
                                f"(prompt {prompts[k][-200:]!r}); rewards must be numbers (not NaN)")
        out[name] = [float(v) for v in values]
    return out
