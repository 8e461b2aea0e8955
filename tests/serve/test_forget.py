"""Forgetting a user over HTTP: afterwards their model is a 404, their key is dead, no file of the store
(folders, database, its journal) holds their canary string, and their slot holds the identity."""

from __future__ import annotations

import httpx
import pytest
from serve_helpers import build_store, fresh, serve_config

from tailorlm.serve.run import background

CANARY = "CANARY-7f3a9c-zebra-umbrella"
USER = "ia3-user-1"


@pytest.fixture
def own_store(tmp_path, tiny):
    return build_store(tmp_path / "store", tiny, per_kind=2)


def files_holding(root, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_delete_forgets_everything_and_resets_the_slot(own_store, tiny):
    root = own_store.root
    user_headers = {"Authorization": f"Bearer {own_store.keys[USER]}"}
    admin = {"Authorization": f"Bearer {own_store.admin}"}
    with (
        background(serve_config(root, retrain=False), base=fresh(tiny)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        posted = http.post(
            f"/v1/users/{USER}/history",
            json={"items": [{"input": f"my secret is {CANARY}", "target": CANARY}], "retrain": False},
            headers=user_headers,
        )
        assert posted.status_code == 202 and posted.json()["added"] == 1
        assert files_holding(root, CANARY.encode()), "the canary should be in the store before deleting"
        served = http.post(
            "/v1/completions", json={"model": USER, "prompt": "hi", "max_tokens": 2}, headers=user_headers
        )
        assert served.status_code == 200
        record = server.store.current(USER)
        bank = next(i for i, b in enumerate(server.engine.banks) if b.kind.name == "ia3")
        manager = server.managers[bank]
        slot = manager.slot_of(f"{record.version}:{USER}")
        assert slot is not None and not manager.bank.is_identity(slot)

        gone = http.delete(f"/v1/users/{USER}", headers=admin)
        assert gone.status_code == 200, gone.text
        assert gone.json()["slots_cleared"] == 1 and gone.json()["keys"] == 1

        assert manager.bank.is_identity(slot)
        assert all(not key.endswith(f":{USER}") for key in manager.resident())
        after = http.post(
            "/v1/completions", json={"model": USER, "prompt": "hi", "max_tokens": 2}, headers=admin
        )
        assert after.status_code == 404 and after.json()["error"]["code"] == "model_not_found"
        assert http.get("/v1/models", headers=user_headers).status_code == 401  # their key died with them
        assert http.delete(f"/v1/users/{USER}", headers=admin).status_code == 404
        others = http.post(
            "/v1/completions",
            json={"model": "ia3-user-0", "prompt": "hi", "max_tokens": 2},
            headers={"Authorization": f"Bearer {own_store.keys['ia3-user-0']}"},
        )
        assert others.status_code == 200
    assert files_holding(root, CANARY.encode()) == []
    assert files_holding(root, USER.encode()) == []
    assert not any(USER in str(p) for p in root.rglob("*"))
