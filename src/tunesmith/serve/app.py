"""The FastAPI application: /v1/models, /v1/chat/completions (JSON or server-sent events), /health.

One model serves one request at a time: requests wait in FIFO order on a lock, so outputs never mix. A
streaming client that disconnects stops its generation and frees the model for the next request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from tunesmith.config import Config
from tunesmith.infer.chat_engine import ChatEngine, generation_for
from tunesmith.serve.protocol import APIError, choice, chunk, completion, to_conversation


def check_request(body: Any, engine: ChatEngine, model_name: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise APIError(404, f"the model `{body.get('model')}` does not exist; this server serves `{model_name}`",
                       "model", "model_not_found")
    for key, kind in (("max_tokens", int), ("n", int), ("seed", int)):
        if body.get(key) is not None and (not isinstance(body[key], kind) or isinstance(body[key], bool)):
            raise APIError(400, f"`{key}` must be an integer", key)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None and not isinstance(body[key], (int, float)):
            raise APIError(400, f"`{key}` must be a number", key)
    if body.get("max_tokens") is not None and body["max_tokens"] < 1:
        raise APIError(400, "`max_tokens` must be at least 1", "max_tokens")
    if not 1 <= (body.get("n") or 1) <= 16:
        raise APIError(400, "`n` must be between 1 and 16", "n")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise APIError(400, "`stop` must be a string or a list of strings", "stop")
    return body


def create_app(engine: ChatEngine, cfg: Config) -> FastAPI:
    app = FastAPI(title="tunesmith")
    model_name = cfg.serve.api_model_name or os.path.basename(str(cfg.model.model_name_or_path).rstrip("/"))
    api_key = cfg.serve.api_key or os.environ.get("API_KEY")
    lock = asyncio.Lock()

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, f"invalid request: {err.errors()[:1]}").body(), status_code=400)

    @app.middleware("http")
    async def require_key(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                err = APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key", kind="authentication_error")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "tunesmith"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        body = check_request(body, engine, model_name)
        conv = to_conversation(body)
        prompt = engine.prompt_ids(conv)
        gen = generation_for(cfg.generation, body.get("max_tokens"), body.get("temperature"), body.get("top_p"))
        if len(prompt) + gen.max_new_tokens > engine.max_length:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({gen.max_new_tokens}) exceed "
                           f"the model's context of {engine.max_length} tokens", "max_tokens",
                           "context_length_exceeded")
        stops = [body["stop"]] if isinstance(body.get("stop"), str) else list(body.get("stop") or [])
        if body.get("stream"):
            return StreamingResponse(stream(request, prompt, gen, stops, body), media_type="text/event-stream")
        choices, used = [], 0
        async with lock:
            for i in range(body.get("n") or 1):
                seed = None if body.get("seed") is None else body["seed"] + i
                answer = await asyncio.to_thread(engine.answer, prompt, gen, stops, seed, bool(conv.tools))
                choices.append(choice(i, answer.text, answer.tool_calls, answer.finish_reason))
                used += answer.completion_tokens
        return completion(model_name, choices, len(prompt), used)

    async def stream(request: Request, prompt: list[int], gen: Any, stops: list[str], body: dict) -> Any:
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        async with lock:
            for i in range(body.get("n") or 1):
                seed = None if body.get("seed") is None else body["seed"] + i
                yield chunk(completion_id, model_name, {"role": "assistant", "content": ""}, None, i)
                if body.get("tools"):  # tool calls are parsed from the whole answer, then sent as one delta
                    answer = await asyncio.to_thread(engine.answer, prompt, gen, stops, seed, True)
                    if answer.text:
                        yield chunk(completion_id, model_name, {"content": answer.text}, None, i)
                    if answer.tool_calls:
                        calls = choice(i, "", answer.tool_calls, "")["message"]["tool_calls"]
                        delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                        yield chunk(completion_id, model_name, delta, None, i)
                    yield chunk(completion_id, model_name, {}, answer.finish_reason, i)
                    continue
                stop_event = threading.Event()
                pieces = engine.stream(prompt, gen, stops, stop_event, seed)
                text = ""
                try:
                    while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                        if await request.is_disconnected():
                            return
                        text += piece
                        yield chunk(completion_id, model_name, {"content": piece}, None, i)
                finally:  # a disconnected client (or any exit) stops the generation and frees the model
                    stop_event.set()
                    await asyncio.to_thread(pieces.close)
                n_tokens = len(engine.tokenizer.encode(text, add_special_tokens=False))
                yield chunk(completion_id, model_name, {}, "length" if n_tokens >= gen.max_new_tokens else "stop", i)
        yield "data: [DONE]\n\n"

    return app
