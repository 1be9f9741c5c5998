"""`tunesmith chat cfg.yaml`: talk to a model in the terminal. Tokens stream as they come; the history is kept;
`clear` starts over, `exit` quits; Ctrl-C stops the current answer, not the program."""

from __future__ import annotations

import threading
from typing import Any

from tunesmith.config import Config
from tunesmith.config.validate import check_finetuning, check_model, raise_if
from tunesmith.data.conversation import Conversation, Message
from tunesmith.infer.reasoning import split_answer

HELP = "Type a message. `clear` forgets the conversation, `exit` quits, Ctrl-C stops an answer."


def run(cfg: Config, extras: dict[str, Any]) -> int:
    raise_if(check_model(cfg) + check_finetuning(cfg))
    from tunesmith.infer.chat_engine import make_chat_engine

    engine = make_chat_engine(cfg)
    conv = Conversation(system=cfg.model.default_system)
    print(HELP, flush=True)
    while True:
        try:
            query = input("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query.strip() == "exit":
            return 0
        if query.strip() == "clear":
            conv = Conversation(system=cfg.model.default_system)
            print("History cleared.", flush=True)
            continue
        if not query.strip():
            continue
        conv.messages.append(Message("user", query))
        print("Assistant: ", end="", flush=True)
        stop = threading.Event()
        answer = ""
        prompt = engine.prompt_ids(conv)
        pieces = engine.stream(prompt, cfg.generation, stop_event=stop)
        try:
            for piece in pieces:
                answer += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stop.set()
            pieces.close()
            print(" [stopped]", end="")
        print(flush=True)
        # history keeps the reasoning beside the answer; the template drops or keeps it as it does when serving
        reasoning, content = split_answer(answer, **engine.reasoning_form(prompt))
        conv.messages.append(Message("assistant", content, reasoning=reasoning))
