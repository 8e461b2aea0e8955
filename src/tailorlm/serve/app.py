"""The HTTP front: OpenAI-compatible routes over the scheduler, admin routes over the users' store.

Every route but ``/health`` needs a key. A user's key reaches that user's model and history only; an
admin key manages users and keys and may call any model; a user key on an admin route is a 403. Every
error, whatever raised it (a bad body, an unknown route, a failing module), is answered with OpenAI's
error body and a 4xx or 5xx, and the process goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tailorlm.engine.continuous import Sampling
from tailorlm.serve import protocol, users_api
from tailorlm.serve.protocol import ApiError, ChatRequest, CompletionRequest
from tailorlm.serve.scheduler import Event, Job
from tailorlm.serve.server import Server
from tailorlm.store.index_backends import StoreLocationError
from tailorlm.users.keys import KeyOwner

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-tailorlm-replica"  # which engine replica answered (a front of several replicas)


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with a 413, whether or not it declares its length.

    The body is read here, before the app sees the request (bodies are small: a prompt and settings), so
    an oversized one is refused the same way however it arrives. Not FastAPI's ``max_body_size``: its
    413 for a declared length is plain text, not OpenAI's error body."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await _too_large(self.limit, send)
                return
            if not message.get("more_body"):
                break
        await self.app(scope, _replay({"type": "http.request", "body": bytes(body)}, receive), send)


def _replay(first: dict, receive: Any) -> Any:
    """A receive that hands out ``first`` once, then whatever the client sends next (a disconnect)."""
    pending = [first]

    async def replayed() -> dict:
        return pending.pop() if pending else await receive()

    return replayed


async def _too_large(limit: int, send: Any) -> None:
    body = json.dumps(
        ApiError(413, f"the request body is over {limit} bytes", code="request_too_large").body()
    ).encode()
    await send(
        {"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="tailorlm", docs_url=None, redoc_url=None, openapi_url=None)
    _errors(app, server)
    _count_requests(app, server)
    _inference_routes(app, server)
    _admin_routes(app, server)
    app.add_middleware(BodyLimit, limit=server.config.max_body_bytes)
    return app


# ---- errors and metrics ----------------------------------------------------------------------------


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _errors(app: FastAPI, server: Server) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}"
        return _error_response(ApiError(400, message, param=".".join(where) or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "unknown_route", 405: "method_not_allowed"}.get(error.status_code)
        return _error_response(ApiError(error.status_code, str(error.detail), code=code))

    @app.exception_handler(StoreLocationError)
    async def index_unavailable(_request: Request, error: StoreLocationError) -> JSONResponse:
        # The store's index (PostgreSQL) is unreachable: nothing is wrong with the request, so retry it.
        log.warning("the store's index is unavailable: %s", error)
        return _error_response(
            ApiError(503, str(error), "server_error", code="index_unavailable", retry_after=1.0)
        )

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error_response(ApiError(500, f"internal error: {type(error).__name__}", "server_error"))


def _count_requests(app: FastAPI, server: Server) -> None:
    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        try:
            response = await call_next(request)
        except Exception as error:  # whatever escaped a route: a 500 with the error body, never a reset
            log.exception("unexpected error")
            response = _error_response(
                ApiError(500, f"internal error: {type(error).__name__}", "server_error")
            )
        route = request.scope.get("route")
        path = getattr(route, "path", "unknown")
        server.metrics.requests.labels(path, str(response.status_code)).inc()
        if response.status_code >= 400:
            server.metrics.errors.labels(str(response.status_code)).inc()
        return response


# ---- auth ------------------------------------------------------------------------------------------


def _owner(server: Server, request: Request) -> KeyOwner:
    owner = server.owner(request.headers.get("authorization"))
    server.limiter.take(f"{owner.role}:{owner.user_id}")
    return owner


def _admin(server: Server, request: Request) -> KeyOwner:
    owner = _owner(server, request)
    if owner.role != "admin":
        raise ApiError(403, "this route needs an admin key", "permission_error", code="admin_only")
    return owner


def _self_or_admin(server: Server, request: Request, user_id: str) -> KeyOwner:
    owner = _owner(server, request)
    if owner.role != "admin" and owner.user_id != user_id:
        raise ApiError(404, f"no user `{user_id}` for this key", code="user_not_found", param="user_id")
    return owner


# ---- inference -------------------------------------------------------------------------------------


def _inference_routes(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "kinds": [spec.kind for spec in server.specs],
            "slots": server.capacity,
            "pending": server.scheduler.pending(),
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        _admin(server, request)
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        owner = _owner(server, request)
        users = server.store.users() if owner.role == "admin" else [owner.user_id]
        data = []
        for user_id in users:
            record = server.store.current(user_id) if user_id else None
            if record is not None:
                data.append(_model_card(user_id, record.created))
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}")
    async def show_model(model: str, request: Request) -> dict:
        owner = _owner(server, request)
        server.module_of(owner, model)
        record = server.store.current(model)
        return _model_card(model, record.created)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        owner = _owner(server, request)
        return await _answer(server, owner, body, body.text(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        owner = _owner(server, request)
        try:
            messages = [
                {"role": m.role if m.role != "developer" else "system", "content": m.text()}
                for m in body.messages
            ]
        except ValueError as error:
            raise ApiError(400, str(error), param="messages") from None
        return await _answer(server, owner, body, messages, chat=True)


def _model_card(user_id: str, created: float) -> dict:
    return {"id": user_id, "object": "model", "created": int(created), "owned_by": user_id}


def _prompt_text(server: Server, user_id: str, content: str | list[dict], chat: bool, item: bool) -> str:
    """The text the model continues. An ``item`` (a label request) is written into the task's prompt under
    the server's recipe, as the benchmark asks it; other prompts get the retrieved history first (when
    configured), in the chat template for chat requests."""
    query = (
        content
        if isinstance(content, str)
        else "\n".join(m["content"] for m in content if m["role"] == "user")
    )
    if item:
        text = server.task_prompt(user_id, query)
        if text is not None:
            return text
    context = server.with_history(user_id, query)
    if not chat:
        return content if context is None else f"{context}\n\n{content}"
    messages = list(content)
    if context is not None:
        messages.insert(0, {"role": "system", "content": context})
    tokenizer = server.prompt_tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return "\n\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


async def _answer(
    server: Server, owner: KeyOwner, body: CompletionRequest | ChatRequest, content: Any, chat: bool
) -> Response:
    version, bank = server.module_of(owner, body.model)
    item = bool(body.labels) and not body.raw_prompt
    text = await asyncio.to_thread(_prompt_text, server, body.model, content, chat, item)
    prompt_ids = server.prompt_tokenizer(text, add_special_tokens=False)["input_ids"]
    new_tokens = body.new_tokens()
    param = "messages" if chat else "prompt"
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", param=param)
    if len(prompt_ids) + new_tokens > server.config.max_context:
        raise ApiError(
            400,
            f"this model's maximum context length is {server.config.max_context} tokens; the prompt has "
            f"{len(prompt_ids)} and {new_tokens} more were asked for",
            code="context_length_exceeded",
            param=param,
        )
    if body.labels and body.stream:
        raise ApiError(400, "labels cannot be streamed: the answer is one label", param="stream")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(
        user_id=body.model,
        version=version,
        bank=bank,
        prompt_ids=prompt_ids,
        emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        sampling=Sampling(
            max_new_tokens=new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        ),
        stops=body.stops(),
        labels=tuple(body.labels) if body.labels else None,
        prompt_text=text,
    )
    server.scheduler.submit(job)
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    placed = {REPLICA_HEADER: job.placed_on} if job.placed_on else {}
    if body.stream:
        return StreamingResponse(
            _stream(server, job, events, request_id, body, chat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **placed},
        )
    pieces = []
    try:
        while True:
            event = await events.get()
            if event.error is not None:
                raise event.error
            pieces.append(event.text)
            if event.final:
                break
    except asyncio.CancelledError:
        server.scheduler.cancel(job)
        raise
    server.metrics.tokens.inc(event.completion_tokens)
    answer = ("" if chat or not getattr(body, "echo", False) else text) + "".join(pieces)
    counts = protocol.usage(event.prompt_tokens, event.completion_tokens)
    extra = {"label_scores": event.scores} if event.scores is not None else None
    build = protocol.chat_body if chat else protocol.completion_body
    return JSONResponse(build(request_id, body.model, answer, event.finish, counts, extra), headers=placed)


async def _stream(
    server: Server,
    job: Job,
    events: asyncio.Queue[Event],
    request_id: str,
    body: CompletionRequest | ChatRequest,
    chat: bool,
) -> AsyncIterator[str]:
    first = True
    finished = False
    try:
        while True:
            event = await events.get()
            if event.error is not None:
                yield _sse({"error": event.error.body()["error"]})
                finished = True
                break
            if event.text or first:
                yield _sse(protocol.chunk(request_id, body.model, chat, event.text, None, first))
                first = False
            if event.final:
                finished = True
                server.metrics.tokens.inc(event.completion_tokens)
                yield _sse(protocol.chunk(request_id, body.model, chat, None, event.finish, False))
                if body.include_usage():
                    counts = protocol.usage(event.prompt_tokens, event.completion_tokens)
                    yield _sse(protocol.usage_chunk(request_id, body.model, chat, counts))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream
            server.scheduler.cancel(job)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# ---- admin and per-user routes ---------------------------------------------------------------------


def _admin_routes(app: FastAPI, server: Server) -> None:
    users_api.register(app, server, _admin, _self_or_admin)
