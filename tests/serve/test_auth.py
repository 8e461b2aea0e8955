"""The full auth matrix: every route with the user's own key, another user's key, no key, a bad key and
an admin key. Destructive admin routes come last, so each cell sees the same store."""

from __future__ import annotations

import httpx
import pytest

OWNER, OTHER = "lora-user-0", "ia3-user-0"

# (method, path, json body, who may call it): "public" anyone, "key" any valid key, "own" the user named
# in the path or the model (and admins), "admin" admins only.
ROUTES = [
    ("GET", "/health", None, "public"),
    ("GET", "/metrics", None, "admin"),
    ("GET", "/v1/models", None, "key"),
    ("GET", f"/v1/models/{OWNER}", None, "own"),
    ("POST", "/v1/completions", {"model": OWNER, "prompt": "hi", "max_tokens": 2}, "own"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": OWNER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "own",
    ),
    ("GET", f"/v1/users/{OWNER}", None, "own"),
    (
        "POST",
        f"/v1/users/{OWNER}/history",
        {"items": [{"input": "a", "target": "b"}], "retrain": False},
        "own",
    ),
    ("GET", f"/v1/users/{OWNER}/jobs/train-unknown", None, "own"),
    ("GET", "/v1/users", None, "admin"),
    ("POST", "/v1/users", {"user_id": "made-by-admin"}, "admin"),
    ("POST", f"/v1/users/{OWNER}/keys", None, "admin"),
    ("DELETE", f"/v1/users/{OWNER}/keys", None, "admin"),
    ("DELETE", f"/v1/users/{OWNER}", None, "admin"),
]


def expected(scope: str, who: str) -> set[int]:
    if scope == "public":
        return {200}
    if who in ("none", "bad"):
        return {401}
    if scope == "admin":
        return {200, 201} if who == "admin" else {403}
    if scope == "own" and who == "other":
        return {404}
    return {200, 201, 202}


def test_every_route_with_every_key(live, store_users):
    headers = {
        "own": {"Authorization": f"Bearer {store_users.keys[OWNER]}"},
        "other": {"Authorization": f"Bearer {store_users.keys[OTHER]}"},
        "none": {},
        "bad": {"Authorization": "Bearer tlm-u-" + "x" * 43},
        "admin": {"Authorization": f"Bearer {store_users.admin}"},
    }
    failures = []
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for who in ("none", "bad", "other", "own", "admin"):
            for method, path, body, scope in ROUTES:
                answer = http.request(method, path, json=body, headers=headers[who])
                wanted = expected(scope, who)
                if path.endswith("train-unknown") and who in ("own", "admin"):
                    wanted = {404}  # allowed in, but there is no such job
                    assert answer.json()["error"]["code"] == "job_not_found"
                if answer.status_code not in wanted:
                    failures.append((who, method, path, answer.status_code, answer.text[:120]))
                if answer.status_code >= 400:
                    error = answer.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}, (who, path)
                if answer.status_code == 401:
                    assert error["code"] == "invalid_api_key"
    assert not failures, failures


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Bearer",
        "Basic abc",
        "Bearer  tlm-u-two-spaces",
        "bearer tlm-u-short",
        b"Bearer \xe9\xe9\xff",
        "Bearer " + "a" * 5000,
    ],
)
def test_malformed_authorization_is_401(live, authorization):
    answer = httpx.get(f"{live.url}/v1/models", headers={"Authorization": authorization}, timeout=30)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
