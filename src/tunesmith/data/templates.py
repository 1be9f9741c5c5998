"""Chat templates: one rendering path for all of them.

Every template is a Jinja chat template rendered by transformers' own `apply_chat_template`: the model's own
(`template: auto`), a named one from resources/templates.yaml (turned into Jinja here), or a .jinja file.
Which characters belong to assistant turns is derived mechanically: render the conversation up to each
assistant turn with the generation prompt (P), then including that turn (Q); the turn is Q minus P, trailing
whitespace excluded. So the training format can never drift from the format the model is served with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tunesmith.data.conversation import Conversation
from tunesmith.data.errors import DataError

SENTINEL = "\u2063tunesmith-sentinel\u2063"


@dataclass
class Segment:
    start: int
    end: int
    is_response: bool
    turn: int  # index of the assistant turn this segment belongs to (prompt segments: the turn they lead to)


@dataclass
class RenderedChat:
    text: str
    segments: list[Segment]
    content_spans: list[tuple[int, int]] = field(default_factory=list)  # message texts that may be shortened


@lru_cache(maxsize=1)
def _named_data() -> dict[str, Any]:
    return yaml.safe_load(resources.files("tunesmith.resources").joinpath("templates.yaml").read_text("utf-8"))


def template_names() -> list[str]:
    return sorted(_named_data()["templates"])


def _expr(text: str) -> str:
    """Slot text -> Jinja output, with {bos}/{eos} as the tokenizer's tokens."""
    out = []
    for i, part in enumerate(text.replace("{eos}", "\0eos\0").replace("{bos}", "\0bos\0").split("\0")):
        if i % 2 == 1:
            out.append("{{ " + part + "_token }}")
        elif part:
            out.append("{{ " + json.dumps(part, ensure_ascii=False) + " }}")
    return "".join(out)


def _split(slot: str) -> tuple[str, str]:
    before, _, after = slot.partition("{content}")
    return _expr(before), _expr(after)


def named_to_jinja(name: str) -> tuple[str, list[str]]:
    """A named template -> (Jinja source, stop strings)."""
    data = _named_data()
    spec = data["templates"][name]
    spec = data["templates"][spec["same_as"]] if "same_as" in spec else spec
    sys_a, sys_b = _split(spec["system"])
    user_a, user_b = _split(spec["user"])
    tool_a, tool_b = _split(spec["tool"])
    asst_a, asst_b = _split(spec["assistant"])
    default_system = json.dumps(spec.get("default_system") or "", ensure_ascii=False)
    preamble_a, _, preamble_b = data["tool_preamble"].partition("{tools}")
    jinja = (
        _expr(spec.get("prefix", ""))
        + "{% if messages and messages[0].role == 'system' %}{% set system = messages[0].content %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = " + default_system + " %}{% endif %}"
        "{% if tools %}{% set tool_lines = tools | map('tojson') | list %}"
        "{% set system = (system ~ '\\n\\n' if system else '') ~ " + json.dumps(preamble_a, ensure_ascii=False)
        + " ~ tool_lines | join('\\n') ~ " + json.dumps(preamble_b, ensure_ascii=False) + " %}{% endif %}"
        "{% if system %}" + sys_a + "{{ system }}" + sys_b + "{% endif %}"
        "{% for m in messages %}"
        "{% if m.role == 'user' %}" + user_a + "{{ m.content }}" + user_b +
        "{% elif m.role == 'tool' %}" + tool_a + "{{ m.content }}" + tool_b +
        "{% elif m.role == 'assistant' %}" + asst_a + "{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}{% if not loop.first or m.content %}{{ '\\n' }}{% endif %}"
        "{{ '<tool_call>' ~ ({'name': c.function.name, 'arguments': c.function.arguments} | tojson) ~ '</tool_call>' }}"
        "{% endfor %}" + asst_b +
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + asst_a + "{% endif %}"
    )
    return jinja, list(spec.get("stop", []))


class ChatTemplate:
    """A Jinja chat template plus what generation needs to know about it."""

    def __init__(self, name: str, jinja: str, tokenizer: Any, stop: list[str] | None = None,
                 default_system: str | None = None):
        self.name, self.jinja, self.tokenizer, self.default_system = name, jinja, tokenizer, default_system
        self.stop = stop or self._derive_stop()

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.jinja, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _derive_stop(self) -> list[str]:
        """The end-of-turn text: what the template writes right after an assistant's content."""
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
        try:
            after = self.render(msgs).split(SENTINEL, 1)[1].strip()
        except Exception:
            after = ""
        stops = [after] if after else []
        eos = getattr(self.tokenizer, "eos_token", None)
        if eos and eos not in stops:
            stops.append(eos)
        return stops

    def messages_of(self, conv: Conversation) -> list[dict[str, Any]]:
        messages = conv.hf_messages()
        if not conv.system and self.default_system:
            messages.insert(0, {"role": "system", "content": self.default_system})
        return messages

    def render_prompt(self, conv: Conversation) -> str:
        """The prompt for generation: everything up to the last user turn plus the generation prompt."""
        messages = self.messages_of(conv)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self.render(messages, conv.tools, add_generation_prompt=True)

    def render_chat(self, conv: Conversation) -> RenderedChat:
        messages = self.messages_of(conv)
        full = self.render(messages, conv.tools)
        segments, cursor, turn = [], 0, 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self.render(messages[:i], conv.tools, add_generation_prompt=True)
            upto = self.render(messages[: i + 1], conv.tools)
            if not upto.startswith(before) or not full.startswith(upto) or len(before) < cursor:
                raise DataError(
                    f"template `{self.name}` does not render conversations prefix by prefix (assistant turn {turn} "
                    "renders differently once later turns follow), so the loss mask cannot be derived",
                    fix="set `template` to a named template (chatml, llama3, qwen, default, ...)",
                    reason="template not prefix-stable")
            end = len(upto.rstrip())
            segments.append(Segment(cursor, len(before), False, turn))
            segments.append(Segment(len(before), end, True, turn))
            cursor, turn = end, turn + 1
        if cursor < len(full):
            segments.append(Segment(cursor, len(full), False, turn))
        return RenderedChat(full, segments, _content_spans(full, messages))


def _content_spans(text: str, messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Where each message's own text sits in the rendering (found in order); these may be shortened."""
    spans, cursor = [], 0
    for msg in messages:
        content = msg.get("content") or ""
        if not content:
            continue
        at = text.find(content, cursor)
        if at >= 0:
            spans.append((at, at + len(content)))
            cursor = at + len(content)
    return spans


def load_template(name: str, tokenizer: Any, default_system: str | None = None) -> ChatTemplate:
    """`auto`, a named template, or a path to a .jinja file."""
    if name == "auto":
        jinja = getattr(tokenizer, "chat_template", None)
        if not jinja:
            raise DataError("`template: auto` but the tokenizer has no chat template",
                            fix=f"set `template` to one of: {', '.join(template_names())}", reason="bad template")
        if isinstance(jinja, dict):
            jinja = jinja.get("default") or next(iter(jinja.values()))
        return ChatTemplate("auto", jinja, tokenizer, default_system=default_system)
    if name in _named_data()["templates"]:
        jinja, stop = named_to_jinja(name)
        return ChatTemplate(name, jinja, tokenizer, stop=stop or None, default_system=default_system)
    if name.endswith(".jinja") and Path(name).is_file():
        return ChatTemplate(name, Path(name).read_text(encoding="utf-8"), tokenizer, default_system=default_system)
    raise DataError(f"unknown template `{name}`",
                    fix=f"use `auto`, a .jinja file, or one of: {', '.join(template_names())}", reason="bad template")
