"""OpenAI chat-completions request checking and response shapes (plain dicts, as the API documents them)."""

from __future__ import annotations

import json
import math
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

    def json(self) -> str:
        return json.dumps(self.body(), ensure_ascii=False)


def _reject_constant(name: str) -> Any:
    raise APIError(400, f"the request body holds `{name}`, which is not valid JSON")


def parse_body(raw: bytes) -> Any:
    """The request's JSON: strict (no NaN or Infinity), and every string valid UTF-8 text (no lone surrogates)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    stack = [body]
    while stack:  # iterative: the nesting depth is the client's choice
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "the request holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not "
                               "text; send valid Unicode") from None
    return body


INT64 = 2**63


def _number(body: dict, key: str, low: float, high: float, low_open: bool = False) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"`{key}` must be a number", key)
    if value < low or value > high or (low_open and value == low):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"`{key}` must be in {span}, got {value}", key)


def _integer(body: dict, key: str, low: int, high: int) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"`{key}` must be an integer", key)
    if not low <= value <= high:
        raise APIError(400, f"`{key}` must be between {low} and {high}, got {value}", key)


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise APIError(400, "`tools` must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}", "tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function" \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                           "\"parameters\": {...}}}", f"tools.{i}")


def check_request(body: Any, model_name: str) -> dict[str, Any]:
    """Every field the server uses, checked before any work: a 400 naming the field, never a clamp."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise APIError(404, f"the model `{body.get('model')}` does not exist; this server serves `{model_name}`",
                       "model", "model_not_found")
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        body["max_tokens"] = body["max_completion_tokens"]
    _integer(body, "max_tokens", 1, 2**31 - 1)
    _integer(body, "n", 1, 16)
    _integer(body, "seed", -INT64, INT64 - 1)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1, low_open=True)
    for key in ("stream",):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise APIError(400, f"`{key}` must be true or false", key)
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise APIError(400, "`stream_options` must be an object", "stream_options")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise APIError(400, "`stop` must be a string or a list of strings", "stop")
    _check_tools(body.get("tools"))
    return body


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
        ident = call.get("id")
        calls.append(ToolCall(function["name"], arguments, ident if isinstance(ident, str) and ident else None))
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
        reasoning = msg.get("reasoning_content", msg.get("reasoning")) if role == "assistant" else None
        if reasoning is not None and not isinstance(reasoning, str):
            raise APIError(400, f"messages[{i}].reasoning_content must be text", f"messages.{i}.reasoning_content")
        call_id = msg.get("tool_call_id") if role == "tool" else None
        conv.messages.append(Message(role, _content(msg, i), _tool_calls(msg, i) if role == "assistant" else [],
                                     reasoning=reasoning,
                                     tool_call_id=call_id if isinstance(call_id, str) and call_id else None))
    if not conv.messages or conv.messages[-1].role == "assistant":
        raise APIError(400, "the last message must be from the user (or a tool result)", "messages")
    return conv


def prompt_chars(conv: Conversation) -> int:
    """Characters of text the request brings (messages, system prompt, tool calls): a lower bound on the prompt."""
    calls = sum(len(json.dumps(c.arguments)) + len(c.name) for m in conv.messages for c in m.tool_calls)
    return len(conv.system or "") + sum(len(m.content) for m in conv.messages) + calls


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def new_call_id(short: bool) -> str:
    """An id for a call the model wrote without one: 9 alphanumerics where the template insists (Mistral)."""
    return uuid.uuid4().hex[:9] if short else f"call_{uuid.uuid4().hex[:24]}"


def choice(index: int, text: str, calls: list[ToolCall], finish: str, reasoning: str | None = None,
           short_ids: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [{"id": c.id or new_call_id(short_ids), "type": "function",
                                  "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                                 for c in calls]
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": None}


def chunk(completion_id: str, model: str, delta: dict[str, Any] | None, finish: str | None, index: int = 0,
          usage: dict[str, int] | None = None) -> str:
    """One server-sent event; the usage chunk (`stream_options.include_usage`) has no choices."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]
    data: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model, "choices": choices}
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
