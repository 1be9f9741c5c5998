"""What an engine hands back for one chat answer: a stream of text pieces with its token count and finish
reason, and the whole answer with tool calls parsed out. Shared by the transformers and vLLM engines."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator

from tunesmith.data.conversation import ToolCall
from tunesmith.infer.reasoning import split_answer
from tunesmith.infer.tool_calls import parse_tool_calls  # noqa: F401  (re-exported)

@dataclass
class Answer:
    text: str
    tool_calls: list[ToolCall]
    completion_tokens: int
    finish_reason: str  # stop | length | tool_calls
    reasoning: str | None = None  # the answer's reasoning block, when it wrote one


class GenerationFailed(RuntimeError):
    """generate() raised in its worker thread; the stream ended and the model is free again."""


class Stream:
    """Text pieces of one answer as they are generated (its generation runs in a thread of its own). Once
    exhausted, `completion_tokens` is the number of tokens the model generated and `finish_reason` is `length`
    when max_new_tokens cut the answer, else `stop`. `cancel()` asks the generation to stop (from any thread);
    `join()` waits for its thread; `close()` does both from the reading thread."""

    def __init__(self, pieces: Iterator[str], stop_event: threading.Event | None = None,
                 worker: threading.Thread | None = None):
        self._pieces = pieces
        self.stop_event = stop_event or threading.Event()
        self.worker = worker
        self.completion_tokens = 0
        self.finish_reason = "stop"

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self.stop_event.set()

    def join(self) -> None:
        if self.worker is not None:
            self.worker.join()

    def close(self) -> None:
        self.cancel()
        self._pieces.close()  # type: ignore[attr-defined]
        self.join()


def finish_answer(text: str, stream: Stream, tools: bool, style: str = "hermes",
                  tags: tuple[str, str] | None = None, opened: bool = False) -> Answer:
    """The whole answer: its reasoning block split off (with `tags`; `opened`: the prompt opened the block) and
    tool calls parsed out of the rest, in the template's `style`, when the request offered tools."""
    reasoning = None
    if tags:
        reasoning, text = split_answer(text, tags, opened)
    calls: list[ToolCall] = []
    if tools:
        text, calls = parse_tool_calls(text, style)
    return Answer(text, calls, stream.completion_tokens, "tool_calls" if calls else stream.finish_reason, reasoning)


class ChatEngineBase:
    """What the chat engines (transformers, vLLM) share: the inference tokenizer and template, prompt rendering,
    the shutdown event and whole answers from `stream` (which each engine defines)."""

    def __init__(self, cfg: Any):
        from tunesmith.model.tokenizer import load_inference_tokenizer

        self.cfg = cfg
        self.tokenizer, self.template = load_inference_tokenizer(cfg)
        self.shutdown = threading.Event()  # set when the process is stopping: every generation ends at once

    def prompt_ids(self, conv: Any) -> list[int]:
        return self.tokenizer.encode(self.template.render_prompt(conv), add_special_tokens=False)

    def answer_form(self, prompt: list[int]) -> dict[str, Any]:
        """How to read this template's answers back: tool-call style, reasoning tags, and whether the prompt
        (ending in the opening tag) already opened the reasoning block."""
        tags = self.template.reasoning_tags
        opened = self.tokenizer.decode(prompt[-8:]).rstrip().endswith(tags[0]) if prompt else False
        return {"style": self.template.forms.call_style, "tags": tags, "opened": opened}

    def reasoning_form(self, prompt: list[int]) -> dict[str, Any]:
        form = self.answer_form(prompt)
        return {"tags": form["tags"], "opened": form["opened"]}

    def stream(self, prompt: list[int], gen: Any, extra_stops: list[str] | None = None, stop_event: Any = None,
               seed: int | None = None) -> Stream:
        raise NotImplementedError

    def answer(self, prompt: list[int], gen: Any, extra_stops: list[str] | None = None, seed: int | None = None,
               tools: bool = False) -> Answer:
        stream = self.stream(prompt, gen, extra_stops, seed=seed)
        return finish_answer("".join(stream), stream, tools, **self.answer_form(prompt))
