"""Bad requests get a 4xx with OpenAI's error body, and the server keeps serving everyone afterwards."""

from __future__ import annotations

import concurrent.futures
import json
from urllib.parse import quote

import httpx
import pytest
from serve_helpers import fresh, serve_config

from tailorlm.serve.run import background
from tailorlm.serve.scheduler import SchedulerConfig

USER = "lora-user-0"


@pytest.fixture(scope="module")
def http(live, store_users):
    with httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {store_users.keys[USER]}"}, timeout=60
    ) as client:
        yield client


def ok_completion(http) -> None:
    answer = http.post("/v1/completions", json={"model": USER, "prompt": "still there?", "max_tokens": 3})
    assert answer.status_code == 200, answer.text


def completion(**fields) -> dict:
    return {"model": USER, "prompt": "hello", "max_tokens": 3, **fields}


BAD_BODIES = [
    ("not json", b"{bad json", None),
    ("a list", b"[1, 2]", None),
    ("no model", json.dumps({"prompt": "x"}).encode(), "model"),
    ("no prompt", json.dumps({"model": USER}).encode(), "prompt"),
    ("prompt a number", json.dumps(completion(prompt=5)).encode(), "prompt"),
    ("two prompts", json.dumps(completion(prompt=["a", "b"])).encode(), "prompt"),
    ("max_tokens a word", json.dumps(completion(max_tokens="ten")).encode(), "max_tokens"),
    ("max_tokens 0", json.dumps(completion(max_tokens=0)).encode(), "max_tokens"),
    ("temperature 3", json.dumps(completion(temperature=3)).encode(), "temperature"),
    ("temperature a dict", json.dumps(completion(temperature={"a": 1})).encode(), "temperature"),
    ("top_p 0", json.dumps(completion(top_p=0)).encode(), "top_p"),
    ("n 2", json.dumps(completion(n=2)).encode(), "n"),
    ("logprobs 5", json.dumps(completion(logprobs=5)).encode(), "logprobs"),
    ("five stops", json.dumps(completion(stop=["a", "b", "c", "d", "e"])).encode(), "stop"),
    ("empty labels", json.dumps(completion(labels=[])).encode(), "labels"),
    ("duplicate labels", json.dumps(completion(labels=["a", "a"])).encode(), "labels"),
    ("stream a string", json.dumps(completion(stream="yes please")).encode(), "stream"),
    # A JSON escape of a lone surrogate: Python's parser lets it through, the tokenizer cannot take it.
    ("a lone surrogate in the prompt", json.dumps(completion(prompt="a \ud800 b")).encode(), None),
    ("a lone surrogate in a label", json.dumps(completion(labels=["yes", "\udfff"])).encode(), None),
    ("a lone surrogate in a stop", json.dumps(completion(stop=["\ud83d"])).encode(), None),
]


@pytest.mark.parametrize("name, body, param", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_completion_bodies_are_400(http, name, body, param):
    answer = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


@pytest.mark.parametrize(
    "body",
    [
        {"model": USER},
        {"model": USER, "messages": []},
        {"model": USER, "messages": "hello"},
        {"model": USER, "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": USER, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"model": USER, "messages": [{"role": "user", "content": "hi"}], "labels": ["a"], "stream": True},
        {"model": USER, "messages": [{"role": "user", "content": "a lone \ud800"}]},
        {"model": USER, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
    ],
)
def test_bad_chat_bodies_are_400(http, body):
    # json.dumps escapes a lone surrogate as JSON allows (httpx's json= would fail to encode it)
    answer = http.post(
        "/v1/chat/completions",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


def test_over_the_context_limit_is_400(http, live):
    long_prompt = "word " * (live.config.max_context + 10)
    answer = http.post("/v1/completions", json=completion(prompt=long_prompt))
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    just_over = http.post("/v1/completions", json=completion(prompt="hi", max_tokens=live.config.max_context))
    assert just_over.status_code == 400
    ok_completion(http)


def test_unknown_fields_are_ignored(http):
    answer = http.post(
        "/v1/completions", json=completion(frequency_penalty=0.0, logit_bias={"1": 2}, extra={"x": [1]})
    )
    assert answer.status_code == 200


def test_empty_prompt_is_400(http):
    answer = http.post("/v1/completions", json=completion(prompt=""))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt"


def test_oversized_body_is_413_declared_or_not(http, live):
    big = json.dumps(completion(prompt="x" * (live.config.max_body_bytes + 10))).encode()
    declared = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    streamed = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    ok_completion(http)


def test_unknown_routes_and_methods(http):
    assert http.get("/v1/nothing-here").status_code == 404
    assert http.get("/v1/nothing-here").json()["error"]["code"] == "unknown_route"
    assert http.get("/v1/completions").status_code == 405


@pytest.mark.parametrize("user_id", ["", "x" * 129, "tab\there", "new\nline"])
def test_bad_user_ids_are_400(live, store_users, user_id):
    answer = httpx.post(
        f"{live.url}/v1/users",
        json={"user_id": user_id},
        headers={"Authorization": f"Bearer {store_users.admin}"},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text


@pytest.mark.parametrize("user_id", ["../../escape", "a/b", "a\\b", "..", "."])
def test_a_user_id_that_is_no_single_path_segment_is_refused_naming_the_rule(live, store_users, user_id):
    admin = {"Authorization": f"Bearer {store_users.admin}"}
    answer = httpx.post(f"{live.url}/v1/users", json={"user_id": user_id}, headers=admin, timeout=30)
    assert answer.status_code == 400, answer.text
    assert "'/'" in answer.json()["error"]["message"]  # the rule, not only the refusal
    root = store_users.root.resolve()
    assert not (root.parent / "escape").exists() and not (root.parent.parent / "escape").exists()


def test_every_id_the_rule_allows_is_reachable_and_forgettable_over_http(live, store_users):
    admin = {"Authorization": f"Bearer {store_users.admin}"}
    user_id = "odd ?#%2F&=+é-id"
    made = httpx.post(f"{live.url}/v1/users", json={"user_id": user_id}, headers=admin, timeout=30)
    assert made.status_code == 201, made.text
    again = httpx.post(f"{live.url}/v1/users", json={"user_id": user_id}, headers=admin, timeout=30)
    assert again.status_code == 409
    path = f"{live.url}/v1/users/{quote(user_id, safe='')}"
    mine = {"Authorization": f"Bearer {made.json()['api_key']}"}
    shown = httpx.get(path, headers=mine, timeout=30)
    assert shown.status_code == 200 and shown.json()["user_id"] == user_id
    gone = httpx.delete(path, headers=admin, timeout=30)
    assert gone.status_code == 200 and gone.json()["id"] == user_id
    assert httpx.get(path, headers=admin, timeout=30).status_code == 404


def test_a_key_over_its_rate_limit_gets_429(store_users, tiny):
    with background(
        serve_config(store_users.root, rate_limit=1.0, retrain=False), base=fresh(tiny)
    ) as server:
        headers = {"Authorization": f"Bearer {store_users.keys[USER]}"}
        answers = [httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30) for _ in range(4)]
        codes = [a.status_code for a in answers]
        assert codes[:2] == [200, 200] and 429 in codes[2:]
        limited = next(a for a in answers if a.status_code == 429)
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_error"
        other = {"Authorization": f"Bearer {store_users.keys['ia3-user-0']}"}
        assert httpx.get(f"{server.url}/v1/models", headers=other, timeout=30).status_code == 200


def test_a_full_queue_gets_429_and_the_rest_are_served(store_users, tiny):
    config = serve_config(
        store_users.root, retrain=False, scheduler=SchedulerConfig(max_batch=1, wait_ms=0.0, max_queue=1)
    )
    with background(config, base=fresh(tiny)) as server:
        headers = {"Authorization": f"Bearer {store_users.keys[USER]}"}
        body = completion(prompt="a long answer please", max_tokens=120, temperature=0)

        def call(_):
            return httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(8)))
        codes = sorted(a.status_code for a in answers)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.headers["Retry-After"] and refused.json()["error"]["code"] == "queue_full"
        assert call(0).status_code == 200


# Text the index cannot keep: a lone surrogate (valid JSON escapes, not UTF-8) in any field, and NUL
# (PostgreSQL's text refuses it) in any field; each is a 400 naming the field, and nothing is added.
UNSTORABLE = [
    ("input", "a lone \ud800 surrogate"),
    ("target", "ends \udfff"),
    ("item_id", "id-\ud83d"),
    ("item_key", "key-\udc00"),
    ("input", "a NUL \u0000 inside"),
    ("item_key", "\u0000"),
]


@pytest.mark.parametrize("field, value", UNSTORABLE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(UNSTORABLE)])
def test_history_text_the_index_cannot_keep_is_400_and_adds_nothing(http, store_users, field, value):
    before = http.get(f"/v1/users/{USER}").json()["history"]
    item = {"input": "fine", "target": "fine", field: value}
    body = json.dumps({"items": [item], "retrain": False}).encode()  # ensure_ascii: \\ud800 as an escape
    answer = http.post(
        f"/v1/users/{USER}/history", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["error"]["message"] or answer.json()["error"]["param"], answer.text
    assert http.get(f"/v1/users/{USER}").json()["history"] == before
    ok_completion(http)
