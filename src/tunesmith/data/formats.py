"""Record formats (alpaca, sharegpt, openai, plain text) -> Conversation, with located errors."""

from __future__ import annotations

import json
from typing import Any

from tunesmith.data.conversation import Conversation, Message, ToolCall, split_reasoning
from tunesmith.data.errors import DataError
from tunesmith.data.readers import RawRow
from tunesmith.data.registry import DatasetSpec


class RowContext:
    """Builds errors that point at one row."""

    def __init__(self, spec: DatasetSpec, raw: RawRow, allow_unanswered: bool = False,
                 reasoning_tags: tuple[str, str] = ("<think>", "</think>")):
        self.spec, self.raw, self.allow_unanswered = spec, raw, allow_unanswered
        self.reasoning_tags = reasoning_tags

    def answer(self, content: str, reasoning: Any, field: str, calls: list[ToolCall] | None = None) -> Message:
        """An assistant turn: its reasoning from a separate field, else from a leading reasoning block."""
        if reasoning is not None and not isinstance(reasoning, str):
            raise self.error(f"reasoning must be text, got {type(reasoning).__name__}", field=field,
                             reason="wrong type")
        if reasoning is None:
            reasoning, content = split_reasoning(content, self.reasoning_tags)
        return Message("assistant", content, calls or [], reasoning=reasoning)

    def error(self, message: str, field: str | None = None, fix: str | None = None, reason: str = "bad row"):
        return DataError(f"{message} (dataset `{self.spec.name}`)", file=self.raw.file, row=self.raw.row,
                         field=field, fix=fix, reason=reason)

    def require(self, column: str, role: str) -> Any:
        if column not in self.raw.data:
            present = ", ".join(sorted(self.raw.data)) or "none"
            raise self.error(f"missing required column `{column}` ({role}); the row has: {present}", field=column,
                             fix=f"map `{role}` to the right column under `columns` in dataset_info.json",
                             reason="missing column")
        return self.raw.data[column]


def _text(ctx: RowContext, value: Any, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ctx.error(f"expected text, got {type(value).__name__}", field=column, reason="wrong type")
    return value


def parse_tools(ctx: RowContext, value: Any, column: str) -> list[dict[str, Any]] | None:
    """A JSON list (or text holding one) of function specs -> transformers' `tools` shape."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ctx.error(f"`tools` is not valid JSON: {err.msg} at column {err.colno}", field=column,
                            fix='write a JSON list such as [{"name": "f", "description": "...", "parameters": {...}}]',
                            reason="bad tools") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ctx.error("`tools` must be a list of function specs", field=column, reason="bad tools")
    tools = []
    for tool in value:
        spec = tool.get("function", tool) if tool.get("type", "function") == "function" else tool
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ctx.error("every tool needs a `name`", field=column, reason="bad tools")
        tools.append({"type": "function", "function": spec})
    return tools


def parse_tool_calls(ctx: RowContext, value: Any, field: str) -> list[ToolCall]:
    """A function call turn's content: {"name", "arguments"} or a list of them, as JSON text or objects."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ctx.error(f"function call is not valid JSON: {err.msg} at column {err.colno}", field=field,
                            fix='write {"name": "tool_name", "arguments": {...}}', reason="bad function call") from None
    calls = value if isinstance(value, list) else [value]
    parsed = []
    for outer in calls:
        call = outer.get("function", outer) if isinstance(outer, dict) else outer
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ctx.error("function call needs a `name` and `arguments`", field=field, reason="bad function call")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise ctx.error("function call `arguments` is not valid JSON", field=field,
                                reason="bad function call") from None
        if not isinstance(arguments, dict):
            raise ctx.error("function call `arguments` must be an object", field=field, reason="bad function call")
        call_id = call.get("id", outer.get("id") if isinstance(outer, dict) else None)
        parsed.append(ToolCall(call["name"], arguments, call_id if isinstance(call_id, str) and call_id else None))
    return parsed


def from_alpaca(ctx: RowContext) -> Conversation:
    spec, row = ctx.spec, ctx.raw.data
    prompt_col, query_col = spec.column("prompt", "instruction"), spec.column("query", "input")
    prompt_value = ctx.require(prompt_col, "prompt")
    if prompt_value is None:
        raise ctx.error("is null; it must hold the instruction text", field=prompt_col,
                        fix="fill in the instruction, or remove the row", reason="null field")
    prompt = _text(ctx, prompt_value, prompt_col)
    query = _text(ctx, row.get(query_col), query_col)
    user = "\n".join(p for p in (prompt, query) if p)
    messages = []
    history_col = spec.column("history", "history")
    for i, pair in enumerate(row.get(history_col) or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ctx.error(f"history item {i} must be a [question, answer] pair of text", field=history_col)
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    messages.append(Message("user", user))
    system_col = spec.column("system", "system")
    conv = Conversation(messages=messages, system=_text(ctx, row.get(system_col), system_col) or None,
                        tools=parse_tools(ctx, row.get(spec.column("tools", "tools")), spec.column("tools", "tools")))
    if spec.ranking:
        chosen_col, rejected_col = spec.column("chosen", "chosen"), spec.column("rejected", "rejected")
        conv.chosen = ctx.answer(_text(ctx, ctx.require(chosen_col, "chosen"), chosen_col), None, chosen_col)
        conv.rejected = ctx.answer(_text(ctx, ctx.require(rejected_col, "rejected"), rejected_col), None,
                                   rejected_col)
    else:
        response_col = spec.column("response", "output")
        if ctx.allow_unanswered and not row.get(response_col):
            return conv  # predicting: the answer is what we want to generate
        reasoning_col = spec.column("reasoning", "reasoning")
        conv.messages.append(ctx.answer(_text(ctx, ctx.require(response_col, "response"), response_col),
                                        row.get(reasoning_col), reasoning_col))
    return conv


def _sharegpt_message(ctx: RowContext, item: Any, index: int, column: str) -> Message:
    spec = ctx.spec
    role_tag, content_tag = spec.tag("role_tag"), spec.tag("content_tag")
    if not isinstance(item, dict) or role_tag not in item:
        raise ctx.error(f"message {index} needs a `{role_tag}` key", field=column,
                        fix="set `tags.role_tag`/`content_tag` in dataset_info.json to your keys")
    role = item[role_tag]
    roles = {spec.tag("user_tag"): "user", spec.tag("assistant_tag"): "assistant",
             spec.tag("observation_tag"): "tool", spec.tag("function_tag"): "function_call",
             spec.tag("system_tag"): "system"}
    if role not in roles:
        raise ctx.error(f"message {index} has unknown role `{role}`; expected one of {', '.join(roles)}",
                        field=column, fix="set the role tags under `tags` in dataset_info.json")
    content, where = item.get(content_tag), f"{column}[{index}]"
    if roles[role] == "function_call":
        return Message("assistant", "", parse_tool_calls(ctx, content, where))
    if roles[role] == "assistant":  # OpenAI-style tool calls and reasoning ride on the message
        calls = parse_tool_calls(ctx, item["tool_calls"], where) if item.get("tool_calls") else []
        reasoning = item.get(spec.tag("reasoning_tag"), item.get("reasoning"))
        return ctx.answer(_text(ctx, content, where), reasoning, where, calls)
    call_id = item.get("tool_call_id") if roles[role] == "tool" else None
    return Message(roles[role], _text(ctx, content, where),
                   tool_call_id=call_id if isinstance(call_id, str) and call_id else None)


def from_sharegpt(ctx: RowContext) -> Conversation:
    spec, row = ctx.spec, ctx.raw.data
    column = spec.column("messages", "messages" if spec.formatting == "openai" else "conversations")
    items = ctx.require(column, "messages")
    if not isinstance(items, list):
        raise ctx.error("messages must be a list", field=column)
    messages = [_sharegpt_message(ctx, item, i, column) for i, item in enumerate(items)]
    system_col = spec.column("system", "system")
    system = _text(ctx, row.get(system_col), system_col) or None
    if messages and messages[0].role == "system":
        system = messages.pop(0).content
    tools_col = spec.column("tools", "tools")
    conv = Conversation(messages=messages, system=system, tools=parse_tools(ctx, row.get(tools_col), tools_col))
    if spec.ranking:
        for key in ("chosen", "rejected"):
            col = spec.column(key, key)
            setattr(conv, key, _sharegpt_message(ctx, ctx.require(col, key), 0, col))
    check_turns(ctx, conv, column)
    return conv


def check_turns(ctx: RowContext, conv: Conversation, column: str) -> None:
    """user/tool turns and assistant turns must alternate, start with a user and end with an assistant."""
    for i, msg in enumerate(conv.messages):
        expect_user = i % 2 == 0
        if msg.role == "system":
            raise ctx.error(f"message {i} is a system message; only the first message may be one", field=column)
        if expect_user and msg.role not in ("user", "tool"):
            raise ctx.error(f"roles do not alternate: message {i} is `{msg.role}` where a user (or observation) "
                            "turn was expected", field=column, fix="turns must go user, assistant, user, assistant, ...",
                            reason="roles do not alternate")
        if not expect_user and msg.role != "assistant":
            raise ctx.error(f"roles do not alternate: message {i} is `{msg.role}` where an assistant (or "
                            "function call) turn was expected", field=column,
                            fix="turns must go user, assistant, user, assistant, ...", reason="roles do not alternate")
    want_last = "user" if conv.chosen is not None else "assistant"
    if ctx.allow_unanswered and conv.messages and conv.messages[-1].role in ("user", "tool"):
        return
    if not conv.messages or (conv.messages[-1].role == "assistant") != (want_last == "assistant"):
        raise ctx.error(f"a conversation must end with a{'n assistant' if want_last == 'assistant' else ' user'} turn"
                        + (" (ranking rows put the answers in chosen/rejected)" if conv.chosen is not None else ""),
                        field=column, reason="roles do not alternate")


def check_responses(ctx: RowContext, conv: Conversation) -> None:
    answers = [m for m in conv.messages if m.role == "assistant"] + [m for m in (conv.chosen, conv.rejected) if m]
    for msg in answers:
        if not msg.content.strip() and not msg.tool_calls and not (msg.reasoning or "").strip():
            raise ctx.error("empty response", field=ctx.spec.column("response", "output")
                            if ctx.spec.formatting == "alpaca" else None,
                            fix="remove the row or write the answer", reason="empty response")


def to_text(ctx: RowContext) -> str:
    """The pre-training text of a row: the `text` (or mapped prompt) column; chat rows are joined."""
    spec, row = ctx.spec, ctx.raw.data
    column = spec.column("text") or spec.column("prompt") or ("text" if "text" in row else None)
    if column is None and spec.formatting == "alpaca" and "instruction" in row:
        column = "instruction"
    if column is not None:
        text = _text(ctx, ctx.require(column, "text"), column)
        if spec.formatting == "alpaca" and column != "text" and row.get(spec.column("response", "output")):
            text = text + "\n" + str(row[spec.column("response", "output")])
        return text
    return "\n".join(m.content for m in from_sharegpt(ctx).messages)


def to_conversation(spec: DatasetSpec, raw: RawRow, rows: str, allow_unanswered: bool = False,
                    reasoning_tags: tuple[str, str] = ("<think>", "</think>")) -> Conversation:
    """A row as `rows` asks (the stage's data kind): "text", "chat", "pairs" (a chosen and a rejected answer),
    "feedback" (a chat whose last answer the `kto_tag` column marks desirable or not) or "prompts" (a chat up to
    a user turn; a final answer becomes the reference answer).
    `allow_unanswered`: for prediction, a conversation may end with the user's turn. An assistant turn's
    reasoning comes from its reasoning field (OpenAI `reasoning_content`, the `reasoning` column or tag) or from
    a block in `reasoning_tags` at the start of its text."""
    ctx = RowContext(spec, raw, allow_unanswered or rows == "prompts", reasoning_tags)
    if rows == "text":
        text = to_text(ctx)
        if not text.strip():
            raise ctx.error("empty text", reason="empty text")
        return Conversation(text=text)
    if rows == "feedback" and not spec.column("kto_tag"):
        raise DataError(f"this stage trains on feedback rows (a conversation and whether its last answer is "
                        f"desirable); `{spec.name}` maps no `kto_tag` column", file=str(spec.base_dir /
                        "dataset_info.json"), field=spec.name, fix='add "kto_tag": "<your label column>" to its '
                        '`columns` (a true/false column)', reason="bad registry")
    if spec.ranking != (rows == "pairs"):
        need = ("preference pairs: a ranking dataset (`ranking: true`)" if rows == "pairs" else
                "conversations: a non-ranking dataset")
        raise DataError(f"this stage trains on {need}; `{spec.name}` is not", file=str(spec.base_dir /
                        "dataset_info.json"), field=spec.name, reason="bad registry")
    conv = from_alpaca(ctx) if spec.formatting == "alpaca" else from_sharegpt(ctx)
    check_responses(ctx, conv)
    if rows == "prompts":  # a final answer is the reference reward functions compare with, not trained on
        if conv.messages and conv.messages[-1].role == "assistant":
            conv.reference = conv.messages.pop().content
        conv.columns = dict(raw.data)
    if rows == "feedback":
        column = spec.column("kto_tag")
        value = ctx.require(column, "kto_tag")  # type: ignore[arg-type]
        if not isinstance(value, bool):
            raise ctx.error(f"must be true or false (whether the last answer is desirable), got {value!r}",
                            field=column, fix="write the label as a JSON boolean", reason="bad label")
        conv.desirable = value
    conv.source = (raw.file, raw.row)
    return conv
