"""The FastAPI application: /v1/models, /v1/chat/completions (JSON or server-sent events), /health.

One model answers one request at a time: requests wait their turn in arrival order, so outputs never mix. A
request whose client goes away leaves the queue, or stops its generation; one that waits longer than
`queue_timeout` gets a 503. Every client error is a 4xx with OpenAI's error body. A failure inside generation
ends that request with an error body (a 500, or an error event in a stream) and frees the model for the next.
Parsing, rendering and tokenizing run off the event loop, after a body-size cap and a cheap length bound.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tunesmith.config import Config
from tunesmith.infer.chat_engine import ChatEngine, GenerationFailed, Stream, finish_answer, generation_for
from tunesmith.data.errors import DataError
from tunesmith.infer.reasoning import ReasoningSplitter

DELTA_FIELD = {"reasoning": "reasoning_content", "content": "content"}
from tunesmith.serve.protocol import (APIError, check_request, choice, chunk, completion, parse_body, prompt_chars,
                                      to_conversation, usage)

log = logging.getLogger("tunesmith.serve")
POLL_S = 0.1  # how often a queued or generating request checks that its client is still there


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


class Turns:
    """The model, lent to one request at a time in arrival order."""

    def __init__(self, timeout_s: float):
        self.lock = asyncio.Lock()
        self.timeout_s = timeout_s

    async def wait(self, request: Request) -> None:
        """Queue for the model; leave the queue if the client disconnects or the wait exceeds the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s if self.timeout_s > 0 else None
        task = asyncio.ensure_future(self.lock.acquire())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return
                if await request.is_disconnected():
                    raise ClientGone()
                if deadline is not None and loop.time() >= deadline:
                    raise APIError(503, f"the server is busy: the request waited {self.timeout_s:g} s for the model "
                                   "(`queue_timeout`); try again later", code="queue_timeout", kind="server_error")
        except BaseException:
            if task.done() and not task.cancelled() and task.exception() is None:
                self.lock.release()
            else:
                task.cancel()
            raise

    def release_after(self, stream: Stream | None) -> None:
        """Free the model once `stream`'s generation thread has ended, never while it still runs. Needs no await,
        so it also works from a cancelled task."""
        if stream is None:
            self.lock.release()
            return
        stream.cancel()
        done = asyncio.get_running_loop().run_in_executor(None, stream.join)
        done.add_done_callback(lambda _: self.lock.release())


class TurnStream(StreamingResponse):
    """A server-sent-event response that frees the model when it ends, however it ends."""

    def __init__(self, content: Any, release: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream")
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


async def read_body(request: Request, limit: int) -> bytes:
    too_big = APIError(413, f"the request body is larger than {limit} bytes (`max_request_bytes`)", code="too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for: a prompt of C characters needs at least C / this many tokens."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def create_app(engine: ChatEngine, cfg: Config) -> FastAPI:
    app = FastAPI(title="tunesmith")
    model_name = cfg.serve.api_model_name or os.path.basename(str(cfg.model.model_name_or_path).rstrip("/"))
    api_key = cfg.serve.api_key or os.environ.get("API_KEY")
    turns = Turns(cfg.serve.queue_timeout)
    chars_per_token = longest_token_chars(engine.tokenizer)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, f"invalid request: {err.errors()[:1]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        body = APIError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key", kind="authentication_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "tunesmith"}]}

    async def prepare(request: Request) -> tuple[dict, Any, list[int], Any, list[str]]:
        body = parse_body(await read_body(request, cfg.serve.max_request_bytes))
        body = check_request(body, model_name)
        conv = to_conversation(body)
        gen = generation_for(cfg.generation, body.get("max_tokens"), body.get("temperature"), body.get("top_p"))
        too_long = APIError(400, "", "max_tokens", "context_length_exceeded")
        at_least = prompt_chars(conv) // chars_per_token
        if at_least + gen.max_new_tokens > engine.max_length:  # decided without tokenizing a huge prompt
            too_long.message = (f"the prompt (at least {at_least} tokens) plus max_tokens ({gen.max_new_tokens}) "
                                f"exceed the model's context of {engine.max_length} tokens")
            raise too_long
        try:
            prompt = await asyncio.to_thread(engine.prompt_ids, conv)
        except DataError as err:  # the chat template itself refuses these messages (e.g. a system turn)
            raise APIError(400, err.message, "messages") from None
        if len(prompt) + gen.max_new_tokens > engine.max_length:
            too_long.message = (f"the prompt ({len(prompt)} tokens) plus max_tokens ({gen.max_new_tokens}) exceed "
                                f"the model's context of {engine.max_length} tokens")
            raise too_long
        stops = [body["stop"]] if isinstance(body.get("stop"), str) else list(body.get("stop") or [])
        return body, conv, prompt, gen, stops

    def seed_for(body: dict, i: int) -> int | None:
        return None if body.get("seed") is None else (body["seed"] + i) % 2**64

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        body, conv, prompt, gen, stops = await prepare(request)
        try:
            await turns.wait(request)
        except ClientGone:
            return Response(status_code=499)
        if body.get("stream"):
            current: dict[str, Stream | None] = {"stream": None}
            return TurnStream(events(request, prompt, gen, stops, body, current),
                              lambda: turns.release_after(current["stream"]))
        stream = None
        try:
            choices, used = [], 0
            for i in range(body.get("n") or 1):
                stream = engine.stream(prompt, gen, stops, seed=seed_for(body, i))
                text = await read_all(stream, request)
                answer = finish_answer(text, stream, bool(conv.tools), **engine.answer_form(prompt))
                choices.append(choice(i, answer.text, answer.tool_calls, answer.finish_reason, answer.reasoning,
                                      engine.template.forms.needs_ids))
                used += answer.completion_tokens
        except ClientGone:
            return Response(status_code=499)
        except GenerationFailed as err:
            log.error("%s", err)
            raise APIError(500, str(err), kind="server_error") from None
        finally:
            turns.release_after(stream)
        return completion(model_name, choices, len(prompt), used)

    async def pieces(stream: Stream, request: Request) -> Any:
        """The stream's pieces, read in a worker thread; ClientGone once the client has disconnected."""
        while (piece := await asyncio.to_thread(next, stream, None)) is not None:
            if await request.is_disconnected():
                raise ClientGone()
            yield piece

    async def read_all(stream: Stream, request: Request) -> str:
        return "".join([piece async for piece in pieces(stream, request)])

    async def events(request: Request, prompt: list[int], gen: Any, stops: list[str], body: dict,
                     current: dict[str, Stream | None]) -> Any:
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        used = 0
        try:
            for i in range(body.get("n") or 1):
                yield chunk(completion_id, model_name, {"role": "assistant", "content": ""}, None, i)
                stream = current["stream"] = engine.stream(prompt, gen, stops, seed=seed_for(body, i))
                form = engine.answer_form(prompt)
                if body.get("tools"):  # tool calls are parsed from the whole answer, then sent as one delta
                    answer = finish_answer(await read_all(stream, request), stream, True, **form)
                    if answer.reasoning:
                        yield chunk(completion_id, model_name, {"reasoning_content": answer.reasoning}, None, i)
                    if answer.text:
                        yield chunk(completion_id, model_name, {"content": answer.text}, None, i)
                    if answer.tool_calls:
                        calls = choice(i, "", answer.tool_calls, "", None,
                                       engine.template.forms.needs_ids)["message"]["tool_calls"]
                        delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                        yield chunk(completion_id, model_name, delta, None, i)
                    finish = answer.finish_reason
                else:  # reasoning and content stream as they come, each in its own field
                    splitter = ReasoningSplitter(form["tags"], form["opened"])
                    async for piece in pieces(stream, request):
                        for kind, text in splitter.feed(piece):
                            yield chunk(completion_id, model_name, {DELTA_FIELD[kind]: text}, None, i)
                    for kind, text in splitter.finish():
                        yield chunk(completion_id, model_name, {DELTA_FIELD[kind]: text}, None, i)
                    finish = stream.finish_reason
                used += stream.completion_tokens
                yield chunk(completion_id, model_name, {}, finish, i)
        except ClientGone:
            return
        except GenerationFailed as err:
            log.error("%s", err)
            yield f"data: {APIError(500, str(err), kind='server_error').json()}\n\n"
            return
        if (body.get("stream_options") or {}).get("include_usage"):
            yield chunk(completion_id, model_name, None, None, usage=usage(len(prompt), used))
        yield "data: [DONE]\n\n"

    return app
