"""One model answering chats, token by token: shared by `tunesmith chat` and `tunesmith serve`.

Prompts are rendered with the model's training template; generation streams through transformers'
TextIteratorStreamer and stops at the template's end-of-turn tokens, at extra stop strings, or when the caller
sets `stop_event` (Ctrl-C in the chat, a disconnected client in the server).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Iterator

import torch

from tunesmith.config import Config
from tunesmith.config.fields import GenerationArgs
from tunesmith.infer.answer import (Answer, ChatEngineBase, GenerationFailed, Stream, finish_answer,  # noqa: F401
                                    parse_tool_calls)
from tunesmith.infer.hf import stop_ids


class _StopOnEvent:
    """A StoppingCriteria that ends generation when any of its events is set."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _counting_streamer(tokenizer: Any) -> Any:
    """transformers' TextIteratorStreamer that also counts the generated token ids and keeps the last one."""
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        n_generated = 0
        last_id: int | None = None

        def put(self, value: torch.Tensor) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                ids = value.reshape(-1).tolist()
                self.n_generated += len(ids)
                self.last_id = ids[-1] if ids else self.last_id
            super().put(value)

    return CountingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class ChatEngine(ChatEngineBase):
    def __init__(self, cfg: Config):
        from tunesmith.model.loading import load_for_inference

        super().__init__(cfg)
        self.model = load_for_inference(cfg)
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def stream(self, prompt: list[int], gen: GenerationArgs, extra_stops: list[str] | None = None,
               stop_event: threading.Event | None = None, seed: int | None = None) -> Stream:
        """The answer's text pieces as they are generated; the end-of-turn text itself is never yielded. An
        exception in generate() ends the stream with GenerationFailed."""
        from transformers import StoppingCriteriaList

        stop_event = stop_event or threading.Event()
        streamer = _counting_streamer(self.tokenizer)
        eos = stop_ids(self.tokenizer, self.template.stop)
        sample = gen.do_sample
        kwargs = dict(input_ids=torch.tensor([prompt], device=self.model.device), max_new_tokens=gen.max_new_tokens,
                      do_sample=sample, temperature=float(gen.temperature) if sample else None,
                      top_p=float(gen.top_p) if sample else None, top_k=gen.top_k if sample else None,
                      repetition_penalty=float(gen.repetition_penalty), eos_token_id=eos, pad_token_id=eos[0],
                      streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop_event, self.shutdown)]))
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                if seed is not None:
                    torch.manual_seed(seed)
                self.model.generate(**kwargs)
            except BaseException as err:  # noqa: BLE001 - reported to the caller through the stream
                failure.append(err)
                streamer.end()  # wakes the reader, which then raises GenerationFailed

        worker = threading.Thread(target=generate, daemon=True)
        stream = Stream(iter(()), stop_event, worker)
        stream._pieces = self._pieces(streamer, failure, extra_stops, gen, set(eos), stream)
        worker.start()
        return stream

    def _pieces(self, streamer: Any, failure: list[BaseException], extra_stops: list[str] | None,
                gen: GenerationArgs, eos: set[int], stream: Stream) -> Iterator[str]:
        stop_event, worker = stream.stop_event, stream.worker
        stops = [s for s in (extra_stops or []) + self.template.stop if s]
        text, stopped_by_text = "", False
        try:
            for piece in streamer:
                if not piece:
                    continue
                text += piece
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    stop_event.set()
                    stopped_by_text = True
                    if cut > len(text) - len(piece):
                        yield piece[: cut - (len(text) - len(piece))]
                    break
                yield piece
        finally:
            stop_event.set()
            worker.join()  # type: ignore[union-attr]
            stream.completion_tokens = streamer.n_generated
            hit_limit = streamer.n_generated >= gen.max_new_tokens and streamer.last_id not in eos
            stream.finish_reason = "length" if hit_limit and not stopped_by_text else "stop"
        if failure:
            raise GenerationFailed(f"generation failed: {type(failure[0]).__name__}: {failure[0]}")


def generation_for(base: GenerationArgs, max_tokens: int | None, temperature: float | None,
                   top_p: float | None) -> GenerationArgs:
    """Per-request settings over the configured ones: temperature 0 means greedy."""
    gen = replace(base)
    if max_tokens is not None:
        gen.max_new_tokens = int(max_tokens)
    if temperature is not None:  # JSON clients send whole numbers as integers
        gen.do_sample = temperature > 0
        gen.temperature = float(temperature) if temperature > 0 else gen.temperature
    if top_p is not None:
        gen.top_p = float(top_p)
    return gen


def make_chat_engine(cfg: Config) -> Any:
    """ChatEngine (transformers) or, with `infer_backend: vllm`, the same interface on vLLM."""
    if cfg.model.infer_backend == "vllm":
        from tunesmith.infer.vllm import VLLMChatEngine

        return VLLMChatEngine(cfg)
    return ChatEngine(cfg)
