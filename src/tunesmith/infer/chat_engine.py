"""One model answering chats, token by token: shared by `tunesmith chat` and `tunesmith serve`.

Prompts are rendered with the model's training template; generation streams through transformers'
TextIteratorStreamer and stops at the template's end-of-turn tokens, at extra stop strings, or when the caller
sets `stop_event` (Ctrl-C in the chat, a disconnected client in the server).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch

from tunesmith.config import Config
from tunesmith.config.fields import GenerationArgs
from tunesmith.data.conversation import Conversation, ToolCall
from tunesmith.infer.hf import stop_ids

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split a model's answer into its text and the tool calls written in the template's tool format
    (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`). Malformed calls stay in the text."""
    calls, kept = [], text
    for match in TOOL_CALL_RE.finditer(text):
        try:
            data = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            arguments = data.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    continue
            calls.append(ToolCall(data["name"], arguments if isinstance(arguments, dict) else {}))
            kept = kept.replace(match.group(0), "")
    return kept.strip(), calls


@dataclass
class Answer:
    text: str
    tool_calls: list[ToolCall]
    completion_tokens: int
    finish_reason: str  # stop | length | tool_calls


class _StopOnEvent:
    """A StoppingCriteria that ends generation when an event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    def __init__(self, cfg: Config):
        from tunesmith.data.templates import load_template
        from tunesmith.model.loading import load_for_inference
        from tunesmith.model.tokenizer import load_inference_tokenizer

        self.cfg = cfg
        self.tokenizer, template = load_inference_tokenizer(cfg)
        self.template = template or load_template("default", self.tokenizer, cfg.model.default_system)
        self.model = load_for_inference(cfg)
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def prompt_ids(self, conv: Conversation) -> list[int]:
        return self.tokenizer.encode(self.template.render_prompt(conv), add_special_tokens=False)

    def stream(self, prompt: list[int], gen: GenerationArgs, extra_stops: list[str] | None = None,
               stop_event: threading.Event | None = None, seed: int | None = None) -> Iterator[str]:
        """Text pieces as they are generated; the end-of-turn text itself is never yielded."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        stop_event = stop_event or threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        eos = stop_ids(self.tokenizer, self.template.stop)
        sample = gen.do_sample
        kwargs = dict(input_ids=torch.tensor([prompt], device=self.model.device), max_new_tokens=gen.max_new_tokens,
                      do_sample=sample, temperature=gen.temperature if sample else None,
                      top_p=gen.top_p if sample else None, top_k=gen.top_k if sample else None,
                      repetition_penalty=gen.repetition_penalty, eos_token_id=eos, pad_token_id=eos[0],
                      streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop_event)]))
        if seed is not None:
            torch.manual_seed(seed)
        worker = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        worker.start()
        stops = [s for s in (extra_stops or []) + self.template.stop if s]
        text = ""
        try:
            for piece in streamer:
                if not piece:
                    continue
                text += piece
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    stop_event.set()
                    if cut > len(text) - len(piece):
                        yield piece[: cut - (len(text) - len(piece))]
                    break
                yield piece
        finally:
            stop_event.set()
            worker.join()

    def answer(self, prompt: list[int], gen: GenerationArgs, extra_stops: list[str] | None = None,
               seed: int | None = None, tools: bool = False) -> Answer:
        pieces = list(self.stream(prompt, gen, extra_stops, seed=seed))
        text = "".join(pieces)
        n_tokens = len(self.tokenizer.encode(text, add_special_tokens=False))
        calls: list[ToolCall] = []
        if tools:
            text, calls = parse_tool_calls(text)
        finish = "tool_calls" if calls else ("length" if n_tokens >= gen.max_new_tokens else "stop")
        return Answer(text, calls, n_tokens, finish)


def generation_for(base: GenerationArgs, max_tokens: int | None, temperature: float | None,
                   top_p: float | None) -> GenerationArgs:
    """Per-request settings over the configured ones: temperature 0 means greedy."""
    gen = replace(base)
    if max_tokens is not None:
        gen.max_new_tokens = max_tokens
    if temperature is not None:
        gen.do_sample = temperature > 0
        gen.temperature = temperature if temperature > 0 else gen.temperature
    if top_p is not None:
        gen.top_p = top_p
    return gen


def make_chat_engine(cfg: Config) -> Any:
    """ChatEngine (transformers) or, with `infer_backend: vllm`, the same interface on vLLM."""
    if cfg.model.infer_backend == "vllm":
        from tunesmith.infer.vllm import VLLMChatEngine

        return VLLMChatEngine(cfg)
    return ChatEngine(cfg)
