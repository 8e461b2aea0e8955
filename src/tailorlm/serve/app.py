"""The HTTP front: OpenAI-compatible routes over the scheduler, admin routes over the users' store.

Every route but ``/health`` needs a key, checked before the body is read (a client without a key learns
nothing of the schema and cannot make the server read a large body). A user's key reaches that user's
model and history only; an admin key manages users and keys and may call any model; a user key on an
admin route is a 403. Every error, whatever raised it (a bad body, an unknown route, a failing module),
is answered with OpenAI's error body and a 4xx or 5xx, and the process goes on serving; a 5xx says only
that something failed (the log has the detail).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tailorlm.engine.continuous import Sampling
from tailorlm.methods.blend_part import BlendPart
from tailorlm.serve import protocol, users_api
from tailorlm.serve.protocol import ApiError, ChatRequest, CompletionRequest
from tailorlm.serve.scheduler import Event, Job, JobError
from tailorlm.serve.server import Server
from tailorlm.store.index_backends import StoreLocationError
from tailorlm.users.errors import UserError
from tailorlm.users.keys import KeyOwner

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-tailorlm-replica"  # which engine replica answered (a front of several replicas)


OPEN_ROUTES = ("/health",)  # answered without a key


class Gate:
    """What every request passes before the app: its key (401, or 429 for an address that failed too
    often or a key over its rate), then its body, read whole within ``body_timeout`` seconds (408) and at
    most ``limit`` bytes (413, whether or not it declares its length). Not FastAPI's ``max_body_size``:
    its 413 for a declared length is plain text, not OpenAI's error body. The key's owner is put in the
    request's state (``request.state.owner``)."""

    def __init__(self, app: Any, server: Server) -> None:
        self.app = app
        self.server = server
        self.limit = server.config.max_body_bytes
        self.body_timeout = server.config.body_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        client = (scope.get("client") or ("unknown", 0))[0]
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        try:
            owner = await asyncio.to_thread(self.server.owner, authorization, client)
        except ApiError as error:
            await _refuse(self.server, error, scope, receive, send)
            return
        except StoreLocationError as error:
            await _refuse(self.server, _index_unavailable(error), scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = owner
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _refuse(self.server, _too_large(self.limit), scope, receive, send)
            return
        try:
            first = await asyncio.wait_for(self._body(receive), self.body_timeout)
        except TimeoutError:
            error = ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s")
            await _refuse(self.server, error, scope, receive, send, close=True)
            return
        if isinstance(first, ApiError):
            await _refuse(self.server, first, scope, receive, send)
            return
        await self.app(scope, _replay(first, receive), send)

    async def _body(self, receive: Any) -> dict | ApiError:
        """The whole body as one message, a disconnect, or the 413 for a body over the limit."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            body += message.get("body", b"")
            if len(body) > self.limit:
                return _too_large(self.limit)
            if not message.get("more_body"):
                return {"type": "http.request", "body": bytes(body)}


def _replay(first: dict, receive: Any) -> Any:
    """A receive that hands out ``first`` once, then whatever the client sends next (a disconnect)."""
    pending = [first]

    async def replayed() -> dict:
        return pending.pop() if pending else await receive()

    return replayed


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")


async def _refuse(
    server: Server, error: ApiError, scope: dict, receive: Any, send: Any, close: bool = False
) -> None:
    """Answer ``error`` before the app saw the request (counted as the app counts its answers)."""
    server.metrics.requests.labels("gate", str(error.status)).inc()
    server.metrics.errors.labels(str(error.status)).inc()
    response = _error_response(error)
    if close:  # the rest of the body may still come: the connection cannot carry another request
        response.headers["connection"] = "close"
    await response(scope, receive, send)


def _index_unavailable(error: StoreLocationError) -> ApiError:
    # The store's index (PostgreSQL) is unreachable: nothing is wrong with the request, so retry it.
    log.warning("the store's index is unavailable: %s", error)
    return ApiError(
        503,
        "the store's index is unavailable; retry shortly",
        "server_error",
        code="index_unavailable",
        retry_after=1.0,
    )


# How the scheduler's reasons for not answering a job (``scheduler.JobError``) are said over HTTP:
# reason -> (status, OpenAI error type, code).
_JOB_ERRORS = {
    "queue_full": (429, "rate_limit_error", "queue_full"),
    "user_queue_full": (429, "rate_limit_error", "user_queue_full"),
    "deleted": (404, "invalid_request_error", "model_not_found"),
    "shutting_down": (503, "server_error", "shutting_down"),
    "module_unavailable": (500, "server_error", "module_unavailable"),
    "failed": (500, "server_error", None),
    "cancelled": (499, "invalid_request_error", "cancelled"),
    "replica_unavailable": (503, "server_error", "replica_unavailable"),
    "unsupported": (400, "invalid_request_error", "unsupported"),
}


def _job_error(error: JobError) -> ApiError:
    """The HTTP answer for a job the scheduler did not answer."""
    status, kind, code = _JOB_ERRORS[error.reason]
    param = "model" if error.reason == "deleted" else None
    return ApiError(status, error.message, kind, code=code, param=param, retry_after=error.retry_after)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="tailorlm", docs_url=None, redoc_url=None, openapi_url=None)
    _errors(app, server)
    _count_requests(app, server)
    _inference_routes(app, server)
    _admin_routes(app, server)
    app.add_middleware(Gate, server=server)
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

    @app.exception_handler(UserError)
    async def user_mistake(_request: Request, error: UserError) -> JSONResponse:
        # e.g. a user forgotten between the key check and reading their history
        return _error_response(users_api.user_error(error))

    @app.exception_handler(JobError)
    async def job_refused(_request: Request, error: JobError) -> JSONResponse:
        return _error_response(_job_error(error))

    @app.exception_handler(StoreLocationError)
    async def index_unavailable(_request: Request, error: StoreLocationError) -> JSONResponse:
        return _error_response(_index_unavailable(error))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error_response(_internal_error())


def _count_requests(app: FastAPI, server: Server) -> None:
    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        try:
            response = await call_next(request)
        except Exception:  # whatever escaped a route: a 500 with the error body, never a reset
            log.exception("unexpected error")
            response = _error_response(_internal_error())
        route = request.scope.get("route")
        path = getattr(route, "path", "unknown")
        server.metrics.requests.labels(path, str(response.status_code)).inc()
        if response.status_code >= 400:
            server.metrics.errors.labels(str(response.status_code)).inc()
        return response


# ---- auth ------------------------------------------------------------------------------------------


def _internal_error() -> ApiError:
    return ApiError(500, "the server failed to answer this request; it was logged", "server_error")


def _owner(_server: Server, request: Request) -> KeyOwner:
    """The owner of the request's key, which ``Gate`` checked before the body was read."""
    return request.state.owner


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
    async def health() -> JSONResponse:
        stalled = server.scheduler.stalled_for()
        limit = server.config.scheduler.watchdog_seconds
        body = {
            "status": "stalled" if stalled > limit else "ok",
            "kinds": [spec.kind for spec in server.specs],
            "slots": server.capacity,
            "pending": server.scheduler.pending(),
            "stalled_seconds": round(stalled, 1),
        }
        return JSONResponse(body, status_code=503 if stalled > limit else 200)

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
        return await _answer(server, owner, body, body.text(), request)

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
        return await _answer(server, owner, body, messages, request)


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


def _prepare(
    server: Server, body: CompletionRequest | ChatRequest, content: Any, chat: bool
) -> tuple[str, list[int], int, int]:
    """The prompt's text and token ids, and the tokens the request makes the engine run at worst: the
    prompt and its new tokens, or, for a label request, the prompt and every label with its end token
    (each label continues the prompt). Tokenizing a long prompt takes a while: this runs off the event
    loop."""
    item = bool(body.labels) and not body.raw_prompt
    text = _prompt_text(server, body.model, content, chat, item)
    tokenizer = server.prompt_tokenizer
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if body.labels:
        label_ids = tokenizer(list(body.labels), add_special_tokens=False)["input_ids"]
        widths = [len(ids) + 1 for ids in label_ids]
        return text, prompt_ids, len(prompt_ids) + sum(widths), max(widths)
    return text, prompt_ids, len(prompt_ids) + body.new_tokens(), 0


def _check_size(
    server: Server, body: CompletionRequest | ChatRequest, prompt: int, worst: int, width: int, param: str
) -> None:
    """400 for a request over the context or the memory a request may take, before any work."""
    if not prompt:
        raise ApiError(400, "the prompt is empty", param=param)
    limit = server.config.max_context
    if worst > limit:
        what = "its labels (each with an end token)" if body.labels else f"{body.new_tokens()} new tokens"
        raise ApiError(
            400,
            f"this model's maximum context length is {limit} tokens; the request needs {worst}: a prompt "
            f"of {prompt} and {what}",
            code="context_length_exceeded",
            param="labels" if body.labels and worst - prompt > limit // 2 else param,
        )
    if body.labels:  # on every server, a front of engines elsewhere too (``Server.label_memory``)
        need = server.label_memory(prompt, len(body.labels), width)
        if need > server.config.max_request_bytes:
            raise ApiError(
                400,
                f"scoring {len(body.labels)} labels after a prompt of {prompt} tokens needs about "
                f"{need / 2**20:.0f} MiB, over this server's {server.config.max_request_bytes / 2**20:.0f} "
                "MiB per request; send fewer or shorter labels, or a shorter prompt",
                code="request_too_expensive",
                param="labels",
            )


async def _answer(
    server: Server, owner: KeyOwner, body: CompletionRequest | ChatRequest, content: Any, request: Request
) -> Response:
    chat = isinstance(body, ChatRequest)
    if body.item is None:
        blend, (version, bank) = None, server.module_of(owner, body.model)
    else:
        blend, version, bank = await asyncio.to_thread(server.blend_route, owner, body.model, body.labels)
    param = "messages" if chat else "prompt"
    if body.labels and body.stream:
        raise ApiError(400, "labels cannot be streamed: the answer is one label", param="stream")
    text, prompt_ids, worst, width = await asyncio.to_thread(_prepare, server, body, content, chat)
    _check_size(server, body, len(prompt_ids), worst, width, param)
    if blend is not None and not blend.uses_model:  # the statistics alone: no model to run
        return await _statistics_answer(server, blend, body, chat, len(prompt_ids))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(
        user_id=body.model,
        version=version,
        bank=bank,
        prompt_ids=prompt_ids,
        emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        sampling=Sampling(
            max_new_tokens=body.new_tokens(),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        ),
        stops=body.stops(),
        labels=tuple(body.labels) if body.labels else None,
        prompt_text=text,
    )
    server.scheduler.submit(job)  # a JobError (a full queue) is answered by its handler
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    placed = {REPLICA_HEADER: job.placed_on} if job.placed_on else {}
    if body.stream:
        return StreamingResponse(
            _stream(server, job, events, request_id, body, chat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **placed},
        )
    event = await _last_event(server, job, events, request)
    if event is None:  # the client went away: nobody reads this answer
        return Response(status_code=499)
    pieces, event = event
    scores = event.scores
    if blend is not None and scores is not None:
        label, scores = await asyncio.to_thread(
            server.blended, blend, body.model, body.item, body.labels, scores
        )
        pieces, event = [label], dataclasses.replace(event, completion_tokens=_tokens(server, label))
    server.metrics.tokens.inc(event.completion_tokens)
    answer = ("" if chat or not getattr(body, "echo", False) else text) + "".join(pieces)
    counts = protocol.usage(event.prompt_tokens, event.completion_tokens)
    extra = {"label_scores": scores} if scores is not None else None
    build = protocol.chat_body if chat else protocol.completion_body
    return JSONResponse(build(request_id, body.model, answer, event.finish, counts, extra), headers=placed)


def _tokens(server: Server, label: str) -> int:
    """The completion tokens of a blended answer (the label it chose)."""
    return len(server.prompt_tokenizer(label, add_special_tokens=False)["input_ids"])


async def _statistics_answer(
    server: Server, blend: BlendPart, body: CompletionRequest | ChatRequest, chat: bool, prompt_tokens: int
) -> Response:
    """A label request naming an item, answered by a blend without a model source: from the user's row
    and the item's statistics alone, with no job for the engine."""
    label, scores = await asyncio.to_thread(server.blended, blend, body.model, body.item, body.labels, None)
    counts = protocol.usage(prompt_tokens, _tokens(server, label))
    build = protocol.chat_body if chat else protocol.completion_body
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    return JSONResponse(build(request_id, body.model, label, "stop", counts, {"label_scores": scores}))


async def _last_event(
    server: Server, job: Job, events: asyncio.Queue[Event], request: Request
) -> tuple[list[str], Event] | None:
    """The job's text pieces and final event; None when the client disconnected first (the job is then
    cancelled, so its row stops decoding at the next step and its slot is released)."""
    gone = asyncio.ensure_future(_disconnected(request))
    pieces: list[str] = []
    try:
        while True:
            event = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if event not in done:
                event.cancel()
                server.scheduler.cancel(job)
                return None
            event = event.result()
            if event.error is not None:
                raise _job_error(event.error)
            pieces.append(event.text)
            if event.final:
                return pieces, event
    except asyncio.CancelledError:
        server.scheduler.cancel(job)
        raise
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body was read already: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
                yield _sse({"error": _job_error(event.error).body()["error"]})
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
