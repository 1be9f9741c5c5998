"""A conversation -> the token sequences that train it, with exactly the trained spans a model generates.

The trained part of assistant turn k is what the model must write at inference for that turn: the rendering of
messages[:k+1] minus the rendering of messages[:k] with the generation prompt (P_k), cut after the template's
end-of-turn text. Templates that render history the way they render it later (most) give one sequence, the
whole conversation as `apply_chat_template` writes it. Templates that render an earlier turn differently once
later turns follow (reasoning dropped from history, the system prompt or tools moved to the last user turn)
give one sequence per group of turns that do agree: P_k followed by turn k, with the earlier turns that are a
prefix of it trained there too. The extra tokens this costs are counted in the data report.

Templates whose generation prompt opens the reasoning block and that drop reasoning from every rendered turn
(QwQ, DeepSeek-R1 style) get turn k written as P_k + reasoning + closing tag + the answer as rendered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.data.conversation import Conversation
from tunesmith.data.errors import DataError


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
    content_spans: list[tuple[int, int]]  # message texts that may be shortened
    turns: list[int]  # the assistant turns trained in this sequence
    whole: bool = False  # the text is the template's rendering of the whole conversation


@dataclass
class Turn:
    number: int  # 0 for the first assistant turn
    prompt: str  # the rendering up to this turn with the generation prompt
    answer: str  # what the model writes for this turn, ending with the end-of-turn text

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def located(conv: Conversation, message: str, fix: str, reason: str) -> DataError:
    file, row = conv.source if conv.source else (None, None)
    return DataError(message, file=file, row=row, fix=fix, reason=reason)


def derive_turns(template: Any, conv: Conversation, messages: list[dict[str, Any]]) -> list[Turn]:
    forms, turns = template.forms, []
    reasonings = [m.reasoning if template.enable_thinking else None for m in conv.messages if m.role == "assistant"]
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        k = len(turns)
        prompt = template.render(messages[:i], conv.tools, add_generation_prompt=True, conv=conv)
        upto = template.render(messages[: i + 1], conv.tools, conv=conv)
        tag = next((t for t in forms.tags if prompt.rstrip().endswith(t)), None)
        head = prompt[: prompt.rstrip().rfind(tag)] if tag else prompt
        if upto.startswith(prompt):
            tail = upto[len(prompt):]
        elif tag == forms.tags[0] and upto.startswith(head):  # the prompt opens a block no rendered turn keeps
            sep = "\n" if prompt.endswith("\n") else ""
            reasoning = (reasonings[k] or "").strip("\n")
            rest = upto[len(head):].lstrip("\n")
            if rest.startswith(forms.tags[1]):  # the turn as rendered closes an (empty) block itself
                rest = rest[len(forms.tags[1]):].lstrip("\n")
            tail = reasoning + sep + forms.tags[1] + sep * 2 + rest
        elif tag == forms.tags[1] and upto.startswith(head):  # the prompt closes an empty block: the answer follows
            tail = upto[len(head):].lstrip("\n")
        else:
            raise _not_continuing(template, conv, k)
        turns.append(Turn(k, prompt, _cut_at_end(tail, forms.end_of_turn)))
    return turns


def _not_continuing(template: Any, conv: Conversation, k: int) -> DataError:
    return located(conv, f"template `{template.name}` renders assistant turn {k} so that it does not continue its own "
                   "generation prompt, so what the model must write for that turn is undefined",
                   fix="use another template (a named one or a .jinja file), or report the template to tunesmith",
                   reason="template not self-consistent")


def _cut_at_end(tail: str, end: str) -> str:
    at = tail.rfind(end) if end else -1
    return tail[: at + len(end)] if at >= 0 else tail.rstrip()


def build_sequences(template: Any, conv: Conversation, messages: list[dict[str, Any]]) -> list[RenderedChat]:
    turns = derive_turns(template, conv, messages)
    full = template.render(messages, conv.tools, conv=conv)
    if _embedded(full, turns):
        groups = [(full, turns)]
    else:
        groups, left = [], list(turns)
        while left:
            last = left.pop()
            members = [t for t in left if _embedded(last.text, [t])]
            if not _embedded(last.text, members + [last]):
                members = []
            left = [t for t in left if t not in members]
            groups.append((last.text, members + [last]))
        groups.reverse()
    return [_rendered(text, members, template.forms, conv, text == full) for text, members in groups]


def _embedded(text: str, turns: list[Turn]) -> bool:
    """Every turn's prompt + answer is a prefix of `text`, in order and without overlap."""
    cursor = 0
    for t in turns:
        if not text.startswith(t.text) or len(t.prompt) < cursor:
            return False
        cursor = len(t.text)
    return True


def _rendered(text: str, turns: list[Turn], forms: Any, conv: Conversation, whole: bool) -> RenderedChat:
    segments, cursor, rendered = [], 0, text
    for t in turns:
        start, end = len(t.prompt), len(t.text)
        if not forms.end_written:  # the next turn's header ends this one: train it too (append it at the end)
            if end == len(text.rstrip()) and forms.turn_openers:
                text = text[:end] + forms.turn_openers[0]
            opener = next((o for o in forms.turn_openers if text.startswith(o, end)), None)
            end += len(opener) if opener else 0
        segments.append(Segment(cursor, start, False, t.number))
        segments.append(Segment(start, end, True, t.number))
        cursor = end
    if cursor < len(text):
        segments.append(Segment(cursor, len(text), False, turns[-1].number + 1 if turns else 0))
    return RenderedChat(text, segments, _content_spans(text, conv), [t.number for t in turns],
                        whole and text == rendered)


def _content_spans(text: str, conv: Conversation) -> list[tuple[int, int]]:
    """Where each message's own text sits in the rendering (found in order); these may be shortened."""
    pieces = [conv.system or ""] + [p for m in conv.messages for p in (m.reasoning or "", m.content)]
    spans, cursor = [], 0
    for piece in pieces:
        if not piece:
            continue
        at = text.find(piece, cursor)
        if at >= 0:
            spans.append((at, at + len(piece)))
            cursor = at + len(piece)
    return spans
