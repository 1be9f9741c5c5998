"""The one internal shape every record format becomes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None  # the call id, when the data (or the API request) gives one


@dataclass
class Message:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str | None = None  # an assistant turn's reasoning (the part models write inside <think> tags)
    tool_call_id: str | None = None  # a tool result: the id of the call it answers

    def to_hf(self) -> dict[str, Any]:
        """The message in the common form of transformers' chat templates (arguments as a mapping, reasoning
        as `reasoning_content`); templates that want another form get it from data/template_forms.py."""
        msg: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments},
                                  **({"id": c.id} if c.id else {})} for c in self.tool_calls]
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning
        if self.tool_call_id:
            msg["tool_call_id"] = self.tool_call_id
        return msg


@dataclass
class Conversation:
    """A chat (system, alternating user/assistant turns, tool calls and results), a pairwise preference
    (`chosen`/`rejected` replace the final assistant turn), a chat whose final turn is marked `desirable` or not
    (unpaired feedback), or a plain `text` for pre-training."""

    messages: list[Message] = field(default_factory=list)
    system: str | None = None
    tools: list[dict[str, Any]] | None = None
    chosen: Message | None = None
    rejected: Message | None = None
    text: str | None = None
    desirable: bool | None = None  # unpaired feedback (kto): whether the final assistant turn is a good answer
    reference: str | None = None  # prompts (grpo): the row's reference answer, for reward functions
    columns: dict[str, Any] | None = None  # prompts (grpo): the row as read, for user reward functions
    source: tuple[str, int] | None = None  # (file, row) the conversation came from, for located errors

    def hf_messages(self) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [m.to_hf() for m in self.messages]

    def with_answer(self, answer: Message) -> "Conversation":
        """This conversation's prompt followed by `answer` (a preference pair's chosen or rejected turn)."""
        return replace(self, messages=self.messages + [answer], chosen=None, rejected=None)


def split_reasoning(text: str, tags: tuple[str, str] = ("<think>", "</think>")) -> tuple[str | None, str]:
    """`<think>R</think>answer` -> (R, answer); text without a closed reasoning block -> (None, text). An opening
    tag may be missing (the generation prompt of some templates writes it)."""
    open_tag, close_tag = tags
    if close_tag not in text:
        return None, text
    head, _, answer = text.partition(close_tag)
    stripped = head.lstrip()
    if stripped.startswith(open_tag):
        head = stripped[len(open_tag):]
    elif open_tag in head:  # text before the reasoning block: not a reasoning-first answer
        return None, text
    return head.strip("\n"), answer.lstrip("\n")
