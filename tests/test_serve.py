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
                       "infer_dtype=float32", "max_new_tokens=24", "api_model_name=tiny", "max_request_bytes=200000"])
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
    kwargs = {"temperature": 0, "max_tokens": 16, **kwargs}
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kwargs)


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
    [rendered] = engine.template.render_chat(Conversation([Message("user", "w?"), Message("assistant", "", [call])],
                                                          tools=TOOLS))
    rendered = rendered.text
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


AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def post(server, body, **kwargs):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server[0]}/v1/chat/completions", content=content, headers=AUTH, timeout=60, **kwargs)


def test_integer_temperature_answers_and_the_server_keeps_serving(server, client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 2, "top_p": 1, "seed": 3}
    first = post(server, body)
    assert first.status_code == 200, first.text
    assert post(server, body).json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert ask(client, "hi").choices[0].message.content is not None


def test_client_errors_are_400_with_the_field_named(server):
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ({**good, "temperature": -0.5}, "temperature"),
        (json.dumps(good)[:-1].encode() + b', "temperature": NaN}', None),
        ({**good, "top_p": 0}, "top_p"),
        ({**good, "top_p": 1.5}, "top_p"),
        ({**good, "n": 0}, "n"),
        ({**good, "seed": 2**64}, "seed"),
        ({**good, "seed": 10**40}, "seed"),
        ({**good, "tools": "x"}, "tools"),
        ({**good, "tools": [1, 2]}, "tools.0"),
        ({**good, "stream": "yes"}, "stream"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
        (b"[" * 100_000 + b"]" * 100_000, None),
        ({**good, "messages": [{"role": "user", "content": "hi", "tool_calls": "x"}, "x"]}, None),
    ]
    for body, param in cases:
        response = post(server, body)
        assert response.status_code == 400, (body[:80] if isinstance(body, bytes) else body, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        if param:
            assert error["param"] == param
    assert post(server, good).status_code == 200


def test_body_cap_and_cheap_length_check(server, monkeypatch):
    engine = server[1]
    too_big = post(server, {"messages": [{"role": "user", "content": "a" * 300_000}]})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_large"
    tokenized = []
    monkeypatch.setattr(engine, "prompt_ids", lambda conv: tokenized.append(1) or [1])
    long = post(server, {"messages": [{"role": "user", "content": "word " * 39_000}]})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert tokenized == []  # refused from the character count, without tokenizing


def test_length_finish_reason_and_generated_token_count(server, client):
    plain = ask(client, "Write a long story about a dragon.", max_tokens=3)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Write a long story about a dragon."}], temperature=0,
        max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices
    stopped = ask(client, "hi", max_tokens=2000 - 60)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 2000 - 60


def test_a_generation_failure_is_an_error_and_frees_the_model(server, client, monkeypatch):
    engine = server[1]
    real = engine.model.generate
    calls = []

    def broken(**kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("boom")
        return real(**kwargs)

    monkeypatch.setattr(engine.model, "generate", broken)
    response = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert response.status_code == 500 and "boom" in response.json()["error"]["message"]
    with httpx.stream("POST", f"{server[0]}/v1/chat/completions", headers=AUTH, timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as streamed:
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert "boom" in json.loads(events[-1][6:])["error"]["message"]
    assert ask(client, "hi").choices[0].message.content is not None


@pytest.fixture()
def gated_server():
    """A server whose model waits for `gate` before generating, with a 1.5 s queue timeout."""
    import uvicorn

    from tunesmith.infer.chat_engine import ChatEngine
    from tunesmith.serve.app import create_app

    port = free_port()
    cfg = load_config([f"model_name_or_path={TINY_MODEL}", "template=chatml", f"port={port}", "infer_dtype=float32",
                       "max_new_tokens=4", "queue_timeout=1.5"])
    engine = ChatEngine(cfg)
    gate, started = threading.Event(), []
    real = engine.model.generate

    def gated(**kwargs):
        started.append(kwargs["input_ids"].shape[1])
        gate.wait(30)
        return real(**kwargs)

    engine.model.generate = gated
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, cfg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1/chat/completions", gate, started
    gate.set()
    srv.should_exit = True
    thread.join(timeout=10)


def test_abandoned_requests_leave_the_queue_and_a_long_wait_is_a_503(gated_server):
    url, gate, started = gated_server
    first = {"messages": [{"role": "user", "content": "hi"}]}
    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(httpx.post, url, json=first, timeout=30)
        while not started:
            time.sleep(0.05)
        with pytest.raises(httpx.ReadTimeout):  # this client gives up while queued
            httpx.post(url, json={"messages": [{"role": "user", "content": "a different, longer question"}]},
                       timeout=0.5)
        busy = httpx.post(url, json=first, timeout=30)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_timeout"
        gate.set()
        assert holder.result().status_code == 200
    time.sleep(0.5)
    assert len(started) == 1  # neither the abandoned nor the timed-out request was generated
    assert httpx.post(url, json=first, timeout=30).status_code == 200


def test_sigterm_stops_the_server_mid_generation():
    """`tunesmith serve`'s server, with a model that would generate for a minute: SIGTERM's handler ends it at once."""
    import signal

    import torch

    from tunesmith.infer.chat_engine import ChatEngine
    from tunesmith.serve.app import create_app
    from tunesmith.serve.run import make_server

    port = free_port()
    cfg = load_config([f"model_name_or_path={TINY_MODEL}", "template=chatml", f"port={port}", "infer_dtype=float32"])
    engine = ChatEngine(cfg)

    def endless(**kwargs):  # one token every 10 ms for up to 60 s, until a stopping criterion says stop
        ids, streamer = kwargs["input_ids"], kwargs["streamer"]
        streamer.put(ids.cpu())
        deadline = time.time() + 60
        while time.time() < deadline and not kwargs["stopping_criteria"](ids, None).all():
            streamer.put(torch.tensor([5]))
            time.sleep(0.01)
        streamer.end()

    engine.model.generate = endless
    server = make_server(create_app(engine, cfg), cfg, engine)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    body = {"messages": [{"role": "user", "content": "Write a long story."}], "stream": True, "max_tokens": 1000}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(lines)
        next(lines)
        stopped = time.time()
        server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=20)
    assert not thread.is_alive() and time.time() - stopped < 10


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

        def reasoning_form(self, prompt):
            return {"tags": ("<think>", "</think>"), "opened": False}

    answers = iter(["What is the capital of France?", "exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": print(prompt, end="") or next(answers))
    monkeypatch.setattr(chat_engine, "make_chat_engine", lambda cfg: Interrupted())
    assert chat.run(load_config([f"model_name_or_path={TINY_MODEL}"]), {}) == 0
    out = capsys.readouterr().out
    assert "Assistant: Par [stopped]" in out and out.count("User: ") == 2
