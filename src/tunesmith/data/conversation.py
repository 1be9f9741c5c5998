"""The one internal shape every record format becomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class Message:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_hf(self) -> dict[str, Any]:
        """The message as transformers' chat templates expect it."""
        msg: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in self.tool_calls]
        return msg


@dataclass
class Conversation:
    """A chat (system, alternating user/assistant turns, tool calls and results), a pairwise preference
    (`chosen`/`rejected` replace the final assistant turn), or a plain `text` for pre-training."""

    messages: list[Message] = field(default_factory=list)
    system: str | None = None
    tools: list[dict[str, Any]] | None = None
    chosen: Message | None = None
    rejected: Message | None = None
    text: str | None = None

    def hf_messages(self) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [m.to_hf() for m in self.messages]
