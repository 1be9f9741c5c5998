"""Chat templates: one rendering path for all of them.

Every template is a Jinja chat template rendered by transformers' own `apply_chat_template`: the model's own
(`template: auto`, or a LLaMA-Factory name for it), a named one from resources/templates.yaml (turned into Jinja
here), or a .jinja file. What a template expects (reasoning, argument and id forms) is probed once
(template_forms.py); which characters of a conversation are trained comes from rendering each turn's serving
prompt and the turn itself (turns.py). So the training format can never drift from the format the model is
served with.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tunesmith.data.conversation import Conversation
from tunesmith.data.errors import DataError
from tunesmith.data.template_forms import Forms, probe, template_messages
from tunesmith.data.turns import RenderedChat, Segment, build_sequences  # noqa: F401  (re-exported)

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
    """A Jinja chat template plus what generation needs to know about it. `kwargs` are extra template variables
    (`template_kwargs` and `enable_thinking`), passed on every rendering, in training and at inference alike."""

    def __init__(self, name: str, jinja: str | dict[str, str], tokenizer: Any, stop: list[str] | None = None,
                 default_system: str | None = None, kwargs: dict[str, Any] | None = None,
                 enable_thinking: bool = True, reasoning_tags: tuple[str, str] = ("<think>", "</think>")):
        self.name, self.jinja, self.tokenizer, self.default_system = name, jinja, tokenizer, default_system
        self.enable_thinking = enable_thinking
        self.template_kwargs = dict(kwargs or {})
        self.kwargs = {**self.template_kwargs, "enable_thinking": enable_thinking}
        self.reasoning_tags = reasoning_tags
        self._stop = stop
        self._forms: Forms | None = None

    @property
    def forms(self) -> Forms:
        if self._forms is None:
            self._forms = probe(self.render, self.tokenizer, self.reasoning_tags)
        return self._forms

    @property
    def stop(self) -> list[str]:
        """End-of-turn strings generation stops at: the template's end of turn (or the headers of the turns that
        follow, where it writes none) and the EOS token."""
        if self._stop is None:
            forms = self.forms
            stops = [forms.end_of_turn] if forms.end_of_turn else list(forms.turn_openers)
            eos = getattr(self.tokenizer, "eos_token", None)
            self._stop = stops + ([eos] if eos and eos not in stops else [])
        return self._stop

    def source_for(self, tools: Any) -> str:
        if isinstance(self.jinja, dict):
            return self.jinja.get("tool_use" if tools else "default") or self.jinja.get("default") \
                or next(iter(self.jinja.values()))
        return self.jinja

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               add_generation_prompt: bool = False, conv: Conversation | None = None) -> str:
        """apply_chat_template's text; an error the template raises names the conversation's row."""
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.source_for(tools),
                                                      tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **self.kwargs)
        except Exception as err:  # the template's own raise_exception(), or a Jinja error in its code
            if conv is None:
                raise
            file, row = conv.source if conv.source else (None, None)
            raise DataError(f"the chat template `{self.name}` cannot render this conversation: {err}", file=file,
                            row=row, fix="change the conversation as the template's message asks (e.g. drop the "
                            "system turn or merge it into `default_system`), or use another template",
                            reason="template refused the conversation") from None

    def messages_of(self, conv: Conversation) -> list[dict[str, Any]]:
        return template_messages(conv, self.forms, self.default_system, self.enable_thinking)

    def render_prompt(self, conv: Conversation) -> str:
        """The prompt for generation: everything up to the last user turn plus the generation prompt."""
        if conv.messages and conv.messages[-1].role == "assistant":
            conv = Conversation(conv.messages[:-1], conv.system, conv.tools, source=conv.source)
        return self.render(self.messages_of(conv), conv.tools, add_generation_prompt=True, conv=conv)

    def render_chat(self, conv: Conversation) -> list[RenderedChat]:
        """The sequences that train this conversation (one unless the template renders history differently)."""
        return build_sequences(self, conv, self.messages_of(conv))


def template_problem(name: str) -> str | None:
    """Why `name` is not a template tunesmith can use (checked with the config, before anything loads)."""
    data = _named_data()
    if name == "auto" or name in data["templates"] or name in data["llamafactory"]:
        return None
    if name.endswith(".jinja"):
        return None if Path(name).is_file() else f"template file `{name}` not found"
    return (f"unknown template `{name}`: use `auto`, a .jinja file, one of {', '.join(template_names())}, or a "
            f"LLaMA-Factory name ({', '.join(sorted(data['llamafactory']))})")


def template_note(name: str) -> str | None:
    """What a LLaMA-Factory user should know about `name`: how it is rendered here, or how it differs."""
    data = _named_data()
    if name in data["llamafactory"]:
        settings = ", ".join(f"{k}={v}" for k, v in data["llamafactory"][name].items())
        return f"template `{name}`: the model's own chat template" + (f" with {settings}" if settings else "")
    if name in data["differs"]:
        return f"template `{name}` differs from LLaMA-Factory's: {data['differs'][name]}"
    return None


def load_template(name: str, tokenizer: Any, default_system: str | None = None,
                  kwargs: dict[str, Any] | None = None, enable_thinking: bool = True,
                  reasoning_tags: tuple[str, str] = ("<think>", "</think>")) -> ChatTemplate:
    """`auto`, a named template, a LLaMA-Factory name (the model's own template with that name's settings), or
    a path to a .jinja file."""
    data = _named_data()
    settings = {"default_system": default_system, "kwargs": kwargs, "enable_thinking": enable_thinking,
                "reasoning_tags": reasoning_tags}
    if name == "auto" or name in data["llamafactory"]:
        jinja = getattr(tokenizer, "chat_template", None)
        if not jinja:
            what = "`template: auto`" if name == "auto" else f"template `{name}` (LLaMA-Factory's name for the " \
                "model's own chat template)"
            raise DataError(f"{what} but the tokenizer has no chat template",
                            fix=f"set `template` to one of: {', '.join(template_names())}", reason="bad template")
        if name != "auto" and data["llamafactory"][name].get("enable_thinking") is False:
            settings["enable_thinking"] = False
        return ChatTemplate(name, jinja, tokenizer, **settings)
    if name in data["templates"]:
        jinja, stop = named_to_jinja(name)
        return ChatTemplate(name, jinja, tokenizer, stop=stop or None, **settings)
    if name.endswith(".jinja") and Path(name).is_file():
        return ChatTemplate(name, Path(name).read_text(encoding="utf-8"), tokenizer, **settings)
    raise DataError(template_problem(name) or f"unknown template `{name}`", reason="bad template")
