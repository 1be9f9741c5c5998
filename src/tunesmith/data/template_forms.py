"""What a chat template expects and writes, found by rendering probe conversations once per template.

Templates differ in how they take reasoning (a `reasoning_content` field, a block inside the content, or not at
all: their generation prompt opens the block and history drops it), tool-call arguments (a mapping or a JSON
string), call ids (some raise without them), and how an assistant turn ends (an end-of-turn token, or nothing:
the next turn's header ends it). Each conversation is handed to its template in the form that template wants,
so tunesmith's normalisation never changes what the model's own template would write.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from tunesmith.data.conversation import Conversation
from tunesmith.data.errors import DataError

SENT_ANSWER, SENT_REASON, SENT_USER = "\u2063ts-answer\u2063", "\u2063ts-reason\u2063", "\u2063ts-user\u2063"
SENT_KEY, SENT_VALUE = "ts_key", "ts-value"
PROBE_TOOLS = [{"type": "function", "function": {"name": "ts_probe", "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}]
ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass
class Forms:
    reasoning: str = "inline"  # field | inline | forced (the generation prompt opens the block) | none
    tags: tuple[str, str] = ("<think>", "</think>")
    arguments: str = "mapping"  # mapping | string
    needs_ids: bool = False
    tool_calls: bool = True  # the template writes tool calls at all
    call_style: str = "hermes"  # how a tool call is written: hermes | mistral | llama3 | glm | deepseek (infer/tool_calls.py)
    end_of_turn: str = ""  # what the template writes after an assistant's text ("" if nothing)
    turn_openers: list[str] = field(default_factory=list)  # first tokens of a following turn (when nothing ends one)

    @property
    def end_written(self) -> bool:
        return bool(self.end_of_turn)


def _safe(render: Callable[..., str], *args: Any, **kwargs: Any) -> str | None:
    try:
        return render(*args, **kwargs)
    except Exception:
        return None


def _after(text: str | None, marker: str) -> str | None:
    return text.split(marker, 1)[1] if text and marker in text else None


def _common_tokens(a: str, b: str, tokenizer: Any) -> str:
    """The longest common prefix of two texts in whole tokens (characters could split `<|end|>` from `<|user|>`)."""
    ta, tb = tokenizer.encode(a, add_special_tokens=False), tokenizer.encode(b, add_special_tokens=False)
    n = 0
    while n < min(len(ta), len(tb)) and ta[n] == tb[n]:
        n += 1
    return tokenizer.decode(ta[:n]) if n else ""


def _first_token(text: str, tokenizer: Any) -> str:
    ids = tokenizer.encode(text.lstrip(), add_special_tokens=False)
    return tokenizer.decode(ids[:1]) if ids else ""


def probe(render: Callable[..., str], tokenizer: Any, tags: tuple[str, str]) -> Forms:
    """Render probe conversations through `render(messages, tools, add_generation_prompt)`."""
    forms = Forms(tags=tags)
    user = {"role": "user", "content": "hi"}
    alone = _after(_safe(render, [user, {"role": "assistant", "content": SENT_ANSWER}], None, False), SENT_ANSWER)
    more = _after(_safe(render, [user, {"role": "assistant", "content": SENT_ANSWER},
                                 {"role": "user", "content": SENT_USER}], None, False), SENT_ANSWER)
    if more is not None:
        more = more.split(SENT_USER, 1)[0]
    ends = [t for t in (alone, more) if t is not None]
    common = _common_tokens(ends[0], ends[1], tokenizer) if len(ends) == 2 else (ends[0] if ends else "")
    forms.end_of_turn = common.strip()
    if not forms.end_of_turn:  # the next turn's header ends a turn: the model must learn to write it
        tool = _after(_safe(render, [user, {"role": "assistant", "content": SENT_ANSWER},
                                     {"role": "tool", "content": SENT_USER}], None, False), SENT_ANSWER)
        openers = [_first_token(t.split(SENT_USER, 1)[0], tokenizer) for t in (more, tool) if t]
        forms.turn_openers = list(dict.fromkeys(o for o in openers if o.strip()))
    forms.reasoning = _reasoning_form(render, user, tags)
    _probe_tools(render, user, forms)
    return forms


def _reasoning_form(render: Callable[..., str], user: dict, tags: tuple[str, str]) -> str:
    field_msg = {"role": "assistant", "content": SENT_ANSWER, "reasoning_content": SENT_REASON}
    if SENT_REASON in (_safe(render, [user, field_msg], None, False) or ""):
        return "field"
    inline = {"role": "assistant", "content": f"{tags[0]}\n{SENT_REASON}\n{tags[1]}\n\n{SENT_ANSWER}"}
    if SENT_REASON in (_safe(render, [user, inline], None, False) or ""):
        return "inline"
    prompt = _safe(render, [user], None, True) or ""
    return "forced" if prompt.rstrip().endswith(tags[0]) else "none"


def _probe_tools(render: Callable[..., str], user: dict, forms: Forms) -> None:
    for arguments in ("mapping", "string"):
        for with_id in (False, True):
            args: Any = {SENT_KEY: SENT_VALUE}
            call = {"type": "function", "function": {"name": "ts_probe", "arguments":
                                                     args if arguments == "mapping" else json.dumps(args)}}
            if with_id:
                call["id"] = "a1b2c3d4e"
            msgs = [user, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "content": SENT_USER, "name": "ts_probe",
                     **({"tool_call_id": "a1b2c3d4e"} if with_id else {})}]
            text = _safe(render, msgs, PROBE_TOOLS, False)
            if text is None:
                continue
            if SENT_VALUE in text and f'\\"{SENT_KEY}' not in text:
                forms.arguments, forms.needs_ids = arguments, with_id
                prompt = _safe(render, [user], PROBE_TOOLS, True) or ""
                shared = next((i for i, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt), len(text)))
                forms.call_style = call_style(text[shared:].split(SENT_USER, 1)[0])
                return
    forms.tool_calls = False


def call_style(written: str) -> str:
    """The style of a tool call as a template writes it (how infer/tool_calls.py reads a model's calls back)."""
    if "<arg_key>" in written:
        return "glm"
    if "[TOOL_CALLS]" in written:
        return "mistral"
    if "<\uff5ctool\u2581call\u2581begin\uff5c>" in written:
        return "deepseek"
    if "<tool_call>" in written:
        return "hermes"
    if '"parameters"' in written:
        return "llama3"
    return "hermes"


def call_id(conv: Conversation, turn: int, k: int) -> str:
    """A stable 9-character alphanumeric id (the form the strictest templates accept) for a call with none; it
    depends only on the conversation up to the call, so a served prefix gets the id training saw."""
    seed = json.dumps([conv.system, [m.content for m in conv.messages[:turn + 1]], turn, k], ensure_ascii=False)
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(ID_CHARS[b % len(ID_CHARS)] for b in digest[:9])


def template_messages(conv: Conversation, forms: Forms, default_system: str | None,
                      enable_thinking: bool) -> list[dict[str, Any]]:
    """The conversation as this template wants its messages."""
    out: list[dict[str, Any]] = []
    system = conv.system or default_system
    if system:
        out.append({"role": "system", "content": system})
    pending: list[tuple[str | None, str]] = []  # (id, name) of the last assistant turn's calls, for their results
    for turn, m in enumerate(conv.messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant":
            _put_reasoning(msg, m.reasoning if enable_thinking else None, forms, conv)
            if m.tool_calls:
                _put_calls(msg, m, forms, conv, turn)
                pending = [(c.get("id"), c["function"]["name"]) for c in msg["tool_calls"]]
        elif m.role == "tool":
            answered = next((p for p in pending if m.tool_call_id and p[0] == m.tool_call_id), None)
            answered = answered or (pending[0] if pending else (None, None))
            if answered in pending:
                pending.remove(answered)
            given = m.tool_call_id or answered[0]
            if given and (forms.needs_ids or m.tool_call_id):
                msg["tool_call_id"] = given
            if answered[1]:  # the called function's name (Hermes-style templates require it)
                msg["name"] = answered[1]
        out.append(msg)
    return out


def _put_reasoning(msg: dict[str, Any], reasoning: str | None, forms: Forms, conv: Conversation) -> None:
    if reasoning is None:
        return
    if forms.reasoning == "field":
        msg["reasoning_content"] = reasoning
    elif forms.reasoning == "inline":
        gap = "\n\n" if msg["content"] else ""  # a tool-call turn: the template separates the calls itself
        msg["content"] = f"{forms.tags[0]}\n{reasoning}\n{forms.tags[1]}{gap}{msg['content']}"
    elif forms.reasoning == "none" and reasoning.strip():
        raise DataError("the chat template drops the reasoning of answers (its generation prompt closes the "
                        "reasoning block, so the model is served without thinking)",
                        file=conv.source[0] if conv.source else None, row=conv.source[1] if conv.source else None,
                        fix="set `enable_thinking: false` to train the answers without their reasoning, or turn on "
                            "the template's thinking mode with `template_kwargs` (e.g. {thinking: true})",
                        reason="reasoning dropped by template")
    # forced: the template never writes reasoning; data/turns.py writes it after the generation prompt


def _put_calls(msg: dict[str, Any], m: Any, forms: Forms, conv: Conversation, turn: int) -> None:
    if not forms.tool_calls:
        raise DataError("the chat template does not write tool calls, so this tool-call turn would train nothing "
                        "but its end", file=conv.source[0] if conv.source else None,
                        row=conv.source[1] if conv.source else None,
                        fix="use a template that writes tool calls (e.g. `template: qwen`), or drop tool rows",
                        reason="template has no tool calls")
    calls = []
    for k, c in enumerate(m.tool_calls):
        arguments = c.arguments if forms.arguments == "mapping" else json.dumps(c.arguments, ensure_ascii=False)
        call: dict[str, Any] = {"type": "function", "function": {"name": c.name, "arguments": arguments}}
        ident = c.id or (call_id(conv, turn, k) if forms.needs_ids else None)
        if ident:
            call["id"] = ident
        calls.append(call)
    msg["tool_calls"] = calls
