"""Rank 0's HTTP side: a FastAPI app served by uvicorn in a thread of its own
(docs/design.md §11). Requests are checked and encoded here, then queued
for the ranks; the rank loop's events come back through the request's
asyncio queue. Nothing a client sends reaches the ranks unchecked, and no
error in a request ends the server.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from netp.runtime.serve import api
from netp.runtime.serve.engine import Done, Event, Failed, Job, JobQueue, QueueClosed, QueueFull, Text
from netp.runtime.serve.text import ChatTemplate

MAX_BODY = 8 << 20  # bytes of one request body
RETRY_AFTER = "1"  # seconds a refused client is asked to wait (503)
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: until EOS or a full context


@dataclass
class ServedModel:
    """What the HTTP side knows of the model: its name, context, vocabulary size, tokenizer, template."""

    name: str
    n_ctx: int
    n_vocab: int
    tokenizer: Any  # tokenizers.Tokenizer
    chat: ChatTemplate | None
    created: int


class ServerState:
    def __init__(self, model: ServedModel, queue: JobQueue, stopping: threading.Event, api_key: str | None,
                 prog: str, failed: Callable[[], str | None]):
        self.model, self.queue, self.stopping, self.api_key, self.prog = model, queue, stopping, api_key, prog
        self.failed = failed

    def log(self, line: str) -> None:
        print(f"{self.prog}: {line}", file=sys.stderr, flush=True)


def _error(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise api.ApiError(413, f"the request body is larger than {MAX_BODY >> 20} MiB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise api.ApiError(413, f"the request body is larger than {MAX_BODY >> 20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


def _authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise api.ApiError(401, "Incorrect API key provided: send `Authorization: Bearer KEY` with the server's "
                                "--api-key.", code="invalid_api_key")


def _unavailable(state: ServerState) -> api.ApiError | None:
    reason = state.failed()
    if reason is not None:
        return api.ApiError(503, f"the server lost a rank: {reason}", kind="server_error", code="rank_lost")
    if state.stopping.is_set():
        return api.ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    return None


def _encode(state: ServerState, kind: api.Kind, req: Any) -> list[int]:
    """The request's prompt as token ids, checked against the vocabulary and the context."""
    model = state.model
    if kind == "chat":
        if model.chat is None:
            raise api.ApiError(400, f"the model {model.name} has no chat template (its tokenizer folder holds no "
                                    "chat_template.jinja and tokenizer_config.json has no chat_template); use "
                                    "/v1/completions", param="messages", code="no_chat_template")
        try:
            text = model.chat.render(api.chat_messages(req))
        except ValueError as e:
            raise api.ApiError(400, str(e)[:500], param="messages") from None
        ids = model.tokenizer.encode(text, add_special_tokens=False).ids  # as apply_chat_template encodes
    else:
        prompt = api.completion_prompt(req)
        if isinstance(prompt, str):
            ids = model.tokenizer.encode(prompt).ids  # as ne-run -p encodes
        else:
            ids = prompt
            bad = [t for t in ids if not 0 <= t < model.n_vocab]
            if bad:
                raise api.ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary of {model.n_vocab}",
                                   param="prompt")
    if not ids:
        raise api.ApiError(400, "the prompt is empty (0 tokens)", param="prompt")
    if len(ids) >= model.n_ctx:
        raise api.ApiError(400, f"the prompt has {len(ids)} tokens; the server's context (-c) is {model.n_ctx} tokens "
                                "and must leave room for at least one generated token",
                           param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    return list(ids)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Call:
    """One generation request in flight on the HTTP side."""

    def __init__(self, state: ServerState, path: str, reply: api.Reply, t0: float):
        self.state, self.path, self.reply, self.t0 = state, path, reply, t0
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:  # from rank 0's loop thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: the server is ending
                pass

        self.emit = emit

    def log_done(self, status: int, job: Job, gen_or_reason: Any) -> None:
        seconds = time.monotonic() - self.t0
        if isinstance(gen_or_reason, Done):
            gen = gen_or_reason.gen
            finish = api.finish_reason(gen, gen_or_reason.stopped_by_string)
            self.state.log(f"{status} POST {self.path} prompt {len(gen.prompt)} tok, completion {len(gen.tokens)} "
                           f"tok ({finish}), prefill {gen.prompt_tok_s:.1f} tok/s, decode {gen.decode_tok_s:.2f} "
                           f"tok/s, {seconds:.2f} s")
        else:
            self.state.log(f"{status} POST {self.path} prompt {len(job.prompt)} tok, completion {job.tokens} tok: "
                           f"{gen_or_reason}, {seconds:.2f} s")


def make_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="netp", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(api.error_body(f"{request.method} {request.url.path}: {exc.detail}", kind,
                                           code="not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        state.log(f"500 {request.method} {request.url.path}: {type(exc).__name__}: {exc}")
        return JSONResponse(api.error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        problem = _unavailable(state)
        if problem is not None:
            return _error(problem)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            _authorize(state, request)
        except api.ApiError as e:
            state.log(f"{e.status} GET /v1/models: {e.message}")
            return _error(e)
        m = state.model
        return JSONResponse({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "netp", "max_model_len": m.n_ctx}]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _generate(state, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, "completion")

    return app


async def _generate(state: ServerState, request: Request, kind: api.Kind) -> Response:
    path = request.url.path
    t0 = time.monotonic()
    try:
        _authorize(state, request)
        problem = _unavailable(state)
        if problem is not None:
            raise problem
        body = api.parse_json_body(await _read_body(request))
        req = api.parse_request(api.ChatRequest if kind == "chat" else api.CompletionRequest, body)
        api.check_model(req, state.model.name)
        n_predict = api.max_tokens(req, -1 if kind == "chat" else COMPLETION_DEFAULT_MAX_TOKENS)
        stops = api.stop_strings(req)
        sampling = api.sampling(req)
        prompt = await asyncio.to_thread(_encode, state, kind, req)
        call = _Call(state, path, api.Reply(kind, state.model.name), t0)
        job = Job(prompt, n_predict, sampling, stops, call.emit)
        try:
            state.queue.submit(job)
        except QueueFull as e:
            raise api.ApiError(503, f"the server is busy: {e}; retry later", kind="server_error", code="overloaded",
                               headers={"Retry-After": RETRY_AFTER}) from None
        except QueueClosed:
            raise _unavailable(state) or api.ApiError(503, "the server is shutting down", kind="server_error",
                                                      code="shutting_down") from None
    except api.ApiError as e:
        state.log(f"{e.status} POST {path}: {e.message}")
        return _error(e)
    if req.stream:
        return StreamingResponse(_stream(call, job, api.include_usage(req)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(call, job, request)


async def _stream(call: _Call, job: Job, include_usage: bool) -> AsyncIterator[str]:
    reply, ended = call.reply, False
    try:
        if reply.kind == "chat":
            yield _sse(reply.chunk(text="", role=True))
        while True:
            event = await call.events.get()
            if isinstance(event, Text):
                yield _sse(reply.chunk(text=event.text))
            elif isinstance(event, Done):
                gen = event.gen
                yield _sse(reply.chunk(finish=api.finish_reason(gen, event.stopped_by_string),
                                       extra={"timings": api.timings(gen)}))
                if include_usage:
                    yield _sse(reply.usage_chunk(api.usage(gen)))
                yield "data: [DONE]\n\n"
                ended = True
                call.log_done(200, job, event)
                return
            else:
                assert isinstance(event, Failed)
                yield _sse(api.error_body(event.message, "server_error", code=event.code))
                ended = True
                call.log_done(event.status, job, event.message)
                return
    finally:
        job.delivered.set()
        if not ended:  # the client went away (the stream was cancelled): free the ranks at the next token
            job.cancelled.set()
            call.log_done(499, job, "client disconnected")


async def _collect(call: _Call, job: Job, request: Request) -> Response:
    parts: list[str] = []
    while True:
        try:
            event = await asyncio.wait_for(call.events.get(), DISCONNECT_POLL)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                job.delivered.set()
                call.log_done(499, job, "client disconnected")
                return Response(status_code=499)
            continue
        if isinstance(event, Text):
            parts.append(event.text)
        elif isinstance(event, Done):
            gen = event.gen
            call.log_done(200, job, event)
            return JSONResponse(call.reply.response("".join(parts), api.finish_reason(gen, event.stopped_by_string),
                                                    api.usage(gen), api.timings(gen)),
                                background=BackgroundTask(job.delivered.set))
        else:
            assert isinstance(event, Failed)
            call.log_done(event.status, job, event.message)
            return JSONResponse(api.error_body(event.message, "server_error", code=event.code),
                                status_code=event.status, background=BackgroundTask(job.delivered.set))


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now so a taken port fails before the model loads."""
    from netp.errors import NetpError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise NetpError(None, f"--host {host}: cannot resolve it ({e.strerror})") from e
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise NetpError(None, f"cannot listen on {host}:{port} ({e.strerror})") from e
    sock.set_inheritable(False)
    return sock


class HttpThread:
    """uvicorn serving the app on `sock` in a thread of its own (it installs no signal handlers there)."""

    def __init__(self, app: FastAPI, sock: socket.socket):
        import uvicorn

        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", loop="asyncio",
                                timeout_graceful_shutdown=5, timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.sock = sock
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="netp-http",
                                       daemon=True)

    def start(self, limit: float = 60.0) -> None:
        self.thread.start()
        until = time.monotonic() + limit
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > until:
                from netp.errors import NetpError

                raise NetpError(None, "the HTTP server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
