"""The OpenAI wire format the server speaks: request bodies (validated), response bodies, error bodies.

Requests accept fields they do not use (the client sends some by default) but a known field of the
wrong type or out of range is a 400 naming it. ``labels`` is tailorlm's own field: restrict the answer to
one of the given strings (the benchmark's likelihood decoding) and get every label's log-probability; the
prompt is then the task's item, written into the benchmark's prompt under the server's recipe, unless
``raw_prompt`` is set; ``item`` (with ``labels``) names the task's item the prompt asks about, so that
a store with a blend part answers with the stacked blend of the statistics and the model;
``ignore_eos`` (as in vLLM) generates ``max_tokens`` tokens whatever the model says, for load tests.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Every field is bounded at the edges of what the engine takes, not just by its sign, so that nothing a
# client sends can fail inside the engine loop (where a failure would reach the rows batched with it).
MAX_LABELS = 64
MAX_LABEL_CHARS = 1_000  # a label is an answer, not a document (its tokens also count against the context)
MAX_ITEM_CHARS = 1_000  # an item key (an id), not the item's text
MAX_STOP_CHARS = 256  # text is held back while it could still begin a stop string: keep that short
MAX_TOKENS = 1 << 20  # a schema bound only; the real one is the server's --max-context
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts
# Sampling below these is greedy in all but name, and at the extreme breaks the arithmetic: logits / T
# overflow to inf (then softmax is NaN), and a top_p under float32's resolution keeps nothing.
TEMPERATURE_FLOOR = 1e-2
TOP_P_FLOOR = 1e-3


class ApiError(Exception):
    """An answer other than 200, with OpenAI's error body. ``retry_after`` (seconds) goes in a header."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        elif self.status >= 500 or self.status in (408, 409):
            headers["x-should-retry"] = "false"  # permanent: the client would otherwise retry twice
        return headers


def model_not_found(model: str) -> ApiError:
    # The same answer for another user's model and an unknown one: existence is not revealed.
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def invalid_key() -> ApiError:
    return ApiError(
        401,
        "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
        "invalid_request_error",
        code="invalid_api_key",
    )


def utf8_only(value: Any, path: str = "") -> Any:
    """``value`` (a request body as parsed) if every string in it, keys included, is UTF-8 text, else a
    ``ValueError`` naming where (``items[0].input``). A JSON ``\\ud800`` escape carries a lone surrogate,
    which Python's JSON parser lets through and the tokenizer and the index cannot take. A worklist, not
    recursion: the parser accepts nesting deeper than a request thread's stack would."""
    pending = [(value, path)]
    while pending:
        item, where = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"{where or 'the body'} holds a lone surrogate (U+D800-U+DFFF), not UTF-8 text"
                ) from None
        elif isinstance(item, dict):
            for key, inner in item.items():
                pending.append((key, f"a key in {where or 'the body'}"))
                named = isinstance(key, str) and key.isprintable()
                pending.append((inner, (f"{where}.{key}" if where else key) if named else where))
        elif isinstance(item, list):
            pending.extend((inner, f"{where}[{number}]") for number, inner in enumerate(item))
    return value


class Utf8Body(BaseModel):
    """A request body whose every string is UTF-8 text (``utf8_only``), checked before its fields."""

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        return utf8_only(data)


class _Request(Utf8Body):
    # NaN and infinity are refused outright (Python's JSON parser accepts them, and NaN passes no bound).
    model_config = ConfigDict(extra="allow", strict=False, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=TOP_P_FLOOR, le=1.0)
    n: int = Field(default=1, ge=1, le=1)  # one choice per request; ask again for more
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = Field(default=None, max_length=256)
    labels: list[str] | None = Field(default=None, min_length=1, max_length=MAX_LABELS)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    raw_prompt: bool = False  # with labels: score the prompt as sent, not written into the task's prompt
    # With labels: the task's item the prompt asks about (its key), for the store's blend part.
    item: str | None = Field(default=None, min_length=1, max_length=MAX_ITEM_CHARS)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0.0 < value < TEMPERATURE_FLOOR:
            raise ValueError(
                f"temperature must be 0 (greedy) or at least {TEMPERATURE_FLOOR:g}; below that, sampling "
                "is greedy in all but name"
            )
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (any(not label.strip() for label in value) or len(set(value)) != len(value)):
            raise ValueError("labels must be distinct non-empty strings")
        if value is not None and any(len(label) > MAX_LABEL_CHARS for label in value):
            raise ValueError(f"a label has at most {MAX_LABEL_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _item_with_labels(self) -> _Request:
        if self.item is not None and not self.labels:
            raise ValueError("item names the item a label request asks about: send labels with it")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=0)  # token log-probabilities are not returned

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send one prompt per request")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def new_tokens(self) -> int:
        return self.max_tokens or self.max_completion_tokens or 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request_id: str, model: str, text: str, finish: str, counts: dict[str, int], extra: dict | None = None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish, **(extra or {})}],
        "usage": counts,
    }


def chat_body(
    request_id: str, model: str, text: str, finish: str, counts: dict[str, int], extra: dict | None = None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
                **(extra or {}),
            }
        ],
        "usage": counts,
    }


def chunk(request_id: str, model: str, chat: bool, text: str | None, finish: str | None, first: bool) -> dict:
    """One streamed event: a chat delta or a completion piece."""
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(request_id: str, model: str, chat: bool, counts: dict[str, int]) -> dict:
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": counts,
    }
