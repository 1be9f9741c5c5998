"""OpenAI chat-completions request checking and response shapes (plain dicts, as the API documents them)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tunesmith.data.conversation import Conversation, Message, ToolCall


class APIError(Exception):
    """An error the client caused (4xx), returned in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content):
            raise APIError(400, f"messages[{index}]: only text content is supported", f"messages.{index}.content")
        return "".join(parts)
    if not isinstance(content, str):
        raise APIError(400, f"messages[{index}].content must be text", f"messages.{index}.content")
    return content


def _tool_calls(message: dict[str, Any], index: int) -> list[ToolCall]:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            raise APIError(400, f"messages[{index}]: tool call arguments are not valid JSON",
                           f"messages.{index}.tool_calls") from None
        if not isinstance(function.get("name"), str) or not isinstance(arguments, dict):
            raise APIError(400, f"messages[{index}]: a tool call needs a function name and object arguments",
                           f"messages.{index}.tool_calls")
        calls.append(ToolCall(function["name"], arguments))
    return calls


def to_conversation(body: dict[str, Any]) -> Conversation:
    """Request messages -> Conversation; the order must be [system] user (assistant user|tool ...)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "`messages` must be a non-empty list", "messages")
    conv = Conversation(tools=body.get("tools") or None)
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role must be system, user, assistant or tool", f"messages.{i}.role")
        if role == "system":
            if i != 0:
                raise APIError(400, f"messages[{i}]: a system message may only come first", f"messages.{i}.role")
            conv.system = _content(msg, i)
            continue
        expect_user = len(conv.messages) % 2 == 0
        if expect_user and role == "assistant" or not expect_user and role != "assistant":
            want = "a user or tool" if expect_user else "an assistant"
            raise APIError(400, f"messages[{i}] is `{role}` where {want} message was expected: turns must "
                           "alternate user, assistant, user, ...", f"messages.{i}.role")
        conv.messages.append(Message(role, _content(msg, i), _tool_calls(msg, i) if role == "assistant" else []))
    if not conv.messages or conv.messages[-1].role == "assistant":
        raise APIError(400, "the last message must be from the user (or a tool result)", "messages")
    return conv


def completion(model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def choice(index: int, text: str, calls: list[ToolCall], finish: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                  "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                                 for c in calls]
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": None}


def chunk(completion_id: str, model: str, delta: dict[str, Any], finish: str | None, index: int = 0) -> str:
    data = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
