"""A model's tool calls, parsed back from its answer in the form its template writes them.

Styles: `hermes` (Hermes, Qwen: `<tool_call>{"name": ..., "arguments": ...}</tool_call>`), `deepseek`
(`<｜tool▁calls▁begin｜>` blocks of DeepSeek V3/R1), `mistral`
(`[TOOL_CALLS][{...}, ...]`, or `[TOOL_CALLS]name[ARGS]{...}`), `llama3` (the answer is one JSON object with
`name` and `parameters`), `glm` (`<tool_call>name` then `<arg_key>`/`<arg_value>` pairs). The style comes from
what the template writes for a probe call (data/template_forms.py). Malformed calls stay in the text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tunesmith.data.conversation import ToolCall

HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
GLM_RE = re.compile(r"<tool_call>\s*([^\s<]+)\s*(.*?)</tool_call>", re.S)
GLM_ARG_RE = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
DEEPSEEK_RE = re.compile(r"<\uff5ctool\u2581call\u2581begin\uff5c>(?:function<\uff5ctool\u2581sep\uff5c>)?([^<\n]+?)"
                         r"(?:<\uff5ctool\u2581sep\uff5c>|\n```json\n)(.*?)(?:\n```)?<\uff5ctool\u2581call\u2581end\uff5c>", re.S)
DEEPSEEK_WRAP = ("<\uff5ctool\u2581calls\u2581begin\uff5c>", "<\uff5ctool\u2581calls\u2581end\uff5c>")
MISTRAL_NAMED_RE = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.-]+)\s*\[ARGS\]\s*", re.S)


def _call(data: Any, arguments_key: str = "arguments") -> ToolCall | None:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get(arguments_key, data.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    ident = data.get("id")
    return ToolCall(data["name"], arguments, ident if isinstance(ident, str) else None)


def _json_prefix(text: str) -> tuple[Any, int]:
    """The JSON value at the start of `text` and where it ends; (None, 0) when there is none."""
    try:
        return json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None, 0


def _hermes(text: str) -> tuple[str, list[ToolCall]]:
    calls, kept = [], text
    for match in HERMES_RE.finditer(text):
        data, _ = _json_prefix(match.group(1))
        call = _call(data)
        if call is not None:
            calls.append(call)
            kept = kept.replace(match.group(0), "")
    return kept.strip(), calls


def _glm(text: str) -> tuple[str, list[ToolCall]]:
    calls, kept = [], text
    for match in GLM_RE.finditer(text):
        arguments = {}
        for key, value in GLM_ARG_RE.findall(match.group(2)):
            parsed, end = _json_prefix(value.strip())
            arguments[key.strip()] = parsed if end == len(value.strip()) and end else value
        calls.append(ToolCall(match.group(1), arguments))
        kept = kept.replace(match.group(0), "")
    return kept.strip(), calls


def _mistral(text: str) -> tuple[str, list[ToolCall]]:
    at = text.find("[TOOL_CALLS]")
    if at < 0:
        return text.strip(), []
    head, rest = text[:at], text[at:]
    named = list(MISTRAL_NAMED_RE.finditer(rest))
    if named:  # [TOOL_CALLS]name[ARGS]{...} (newer Mistral templates), possibly several
        calls = []
        for match in named:
            data, _ = _json_prefix(rest[match.end():])
            call = _call({"name": match.group(1), "arguments": data})
            if call is None:
                return text.strip(), []
            calls.append(call)
        return head.strip(), calls
    data, _ = _json_prefix(rest[len("[TOOL_CALLS]"):].lstrip())
    items = data if isinstance(data, list) else [data]
    calls = [_call(item) for item in items]
    if not calls or any(c is None for c in calls):
        return text.strip(), []
    return head.strip(), calls  # type: ignore[return-value]


def _deepseek(text: str) -> tuple[str, list[ToolCall]]:
    at = text.find(DEEPSEEK_WRAP[0])
    if at < 0:
        return text.strip(), []
    calls = []
    for match in DEEPSEEK_RE.finditer(text, at):
        data, end = _json_prefix(match.group(2).strip())
        call = _call({"name": match.group(1).strip(), "arguments": data})
        if call is None:
            return text.strip(), []
        calls.append(call)
    return (text[:at].strip(), calls) if calls else (text.strip(), [])


def _llama3(text: str) -> tuple[str, list[ToolCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    data, end = _json_prefix(body)
    call = _call(data, "parameters") if end and not body[end:].strip() else None
    return ("", [call]) if call is not None else (text.strip(), [])


PARSERS = {"hermes": _hermes, "glm": _glm, "mistral": _mistral, "llama3": _llama3, "deepseek": _deepseek}


def parse_tool_calls(text: str, style: str = "hermes") -> tuple[str, list[ToolCall]]:
    """Split an answer into its text and its tool calls, read in `style`."""
    return PARSERS.get(style, _hermes)(text)
