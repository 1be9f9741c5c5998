"""`tunesmith serve` with the official openai client against a real server on a loopback port, and the chat
REPL through a pseudo-terminal."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ROOT, TINY_MODEL
from tunesmith.config import load_config

KEY = "sk-tunesmith-test"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from tunesmith.infer.chat_engine import ChatEngine
    from tunesmith.serve.app import create_app

    port = free_port()
    cfg = load_config([f"model_name_or_path={TINY_MODEL}", "template=chatml", f"api_key={KEY}", f"port={port}",
                       "infer_dtype=float32", "max_new_tokens=24", "api_model_name=tiny"])
    engine = ChatEngine(cfg)
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, cfg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, text, **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                          temperature=0, max_tokens=16, **kwargs)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}


def test_streamed_text_equals_plain_greedy_text(client):
    plain = ask(client, "What is the capital of France?")
    assert plain.choices[0].message.content and plain.usage.completion_tokens > 0
    stream = ask(client, "What is the capital of France?", stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_n_seed_and_stop(client):
    two = ask(client, "Tell me about Paris.", n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == two.choices[1].message.content  # greedy
    full = ask(client, "Sort these numbers from smallest to largest.\n9, 3, 7").choices[0].message.content
    if len(full) > 4:
        cut = ask(client, "Sort these numbers from smallest to largest.\n9, 3, 7", stop=[full[2:4]])
        assert cut.choices[0].message.content == full[: full.index(full[2:4])]


def test_tool_call_round_trip(client, server):
    from tunesmith.data.conversation import Conversation, Message, ToolCall
    from tunesmith.infer.chat_engine import parse_tool_calls

    engine = server[1]
    # what the template writes for a call is what the server parses back
    call = ToolCall("get_weather", {"city": "Oslo"})
    rendered = engine.template.render_chat(Conversation([Message("user", "w?"), Message("assistant", "", [call])],
                                                        tools=TOOLS)).text
    written = rendered.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert parse_tool_calls(written) == ("", [call])
    # a conversation that carries a call and its result goes through the model
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"weather": "sunny"}'}]
    answer = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auth_and_bad_requests(server):
    url = f"{server[0]}/v1/chat/completions"
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url, json=good).status_code == 401
    assert httpx.post(url, json=good, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{server[0]}/v1/models").status_code == 401
    cases = [
        (b"{not json", 400, None),
        (json.dumps({**good, "model": "gpt-9"}).encode(), 404, "model_not_found"),
        (json.dumps({**good, "messages": [{"role": "assistant", "content": "hi"}]}).encode(), 400, None),
        (json.dumps({**good, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}).encode(),
         400, None),
        (json.dumps({**good, "messages": []}).encode(), 400, None),
        (json.dumps({**good, "max_tokens": 100000}).encode(), 400, "context_length_exceeded"),
        (json.dumps({**good, "temperature": "hot"}).encode(), 400, None),
    ]
    for body, status, code in cases:
        response = httpx.post(url, content=body, headers={**auth, "Content-Type": "application/json"})
        assert response.status_code == status, body
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        if code:
            assert error["code"] == code


def test_fifty_concurrent_requests(client):
    prompts = [f"What is {i} plus {i + 1}?" for i in range(5)]
    expected = {p: ask(client, p).choices[0].message.content for p in prompts}
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda i: (prompts[i % 5], ask(client, prompts[i % 5])), range(50)))
    assert len(results) == 50
    assert all(r.choices[0].message.content == expected[p] for p, r in results)


def test_a_disconnected_stream_frees_the_model(server, client):
    url = f"{server[0]}/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Write a long story."}], "stream": True,
            "max_tokens": 1500, "temperature": 0}
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        next(lines)
    started = time.time()
    assert ask(client, "hi").choices[0].message.content is not None
    assert time.time() - started < 30


def test_chat_repl_in_a_pseudo_terminal():
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "tunesmith.cli", "chat", f"model_name_or_path={TINY_MODEL}",
                                           "template=chatml", "max_new_tokens=8"], cwd=str(ROOT), timeout=60,
                          encoding="utf-8", env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    child.expect("User: ")
    child.sendline("What is the capital of France?")
    child.expect("Assistant: ")
    child.expect("User: ")
    child.sendline("clear")
    child.expect("History cleared.")
    child.expect("User: ")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_chat(monkeypatch, capsys):
    """The REPL's control flow with an engine whose answer is interrupted half way (as Ctrl-C does)."""
    import builtins

    from tunesmith import chat
    from tunesmith.infer import chat_engine

    class Interrupted:
        def prompt_ids(self, conv):
            return [1]

        def stream(self, prompt, gen, stop_event=None):
            yield "Par"
            raise KeyboardInterrupt

    answers = iter(["What is the capital of France?", "exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": print(prompt, end="") or next(answers))
    monkeypatch.setattr(chat_engine, "make_chat_engine", lambda cfg: Interrupted())
    assert chat.run(load_config([f"model_name_or_path={TINY_MODEL}"]), {}) == 0
    out = capsys.readouterr().out
    assert "Assistant: Par [stopped]" in out and out.count("User: ") == 2
