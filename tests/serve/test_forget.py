"""Forgetting a user over HTTP: afterwards their model is a 404, their key is dead, no file of the store
(folders, database, its journal) holds their canary string, and their slot holds the identity."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import time

import httpx
import pytest
from serve_helpers import build_store, fresh, serve_config

from tailorlm.serve.run import background
from tailorlm.users.service import UserService

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


def _retrain(http, key: str) -> dict:
    items = [{"input": f"secret {CANARY} item {i}: agree?", "target": "yes"} for i in range(6)]
    posted = http.post(
        f"/v1/users/{USER}/history", json={"items": items}, headers={"Authorization": f"Bearer {key}"}
    )
    assert posted.status_code == 202, posted.text
    assert posted.json()["job"]["state"] == "running"
    return posted.json()["job"]


def _wait_idle(server, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while server.jobs._processes:
        assert time.monotonic() < deadline, "the retrain did not end in time"
        time.sleep(0.1)


@pytest.mark.parametrize("by", ["http", "another process"])
def test_a_retrain_of_a_forgotten_user_is_cancelled_and_discarded(own_store, tiny, by):
    """Deleting a user while the server retrains them: over HTTP (the server stops the worker) or from
    another process such as ``tailorlm users delete`` (the server learns of it when the worker ends, and
    the store refuses the worker's version). Either way they never come back, the job is cancelled, not
    failed, and its record is gone."""
    admin = {"Authorization": f"Bearer {own_store.admin}"}
    with (
        background(serve_config(own_store.root), base=fresh(tiny)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        job = _retrain(http, own_store.keys[USER])
        time.sleep(1.0)  # the worker is loading or training
        if by == "http":
            gone = http.delete(f"/v1/users/{USER}", headers=admin)
            assert gone.status_code == 200, gone.text
            assert gone.json()["compacted"] is True and gone.json()["compaction"] is None
        else:
            other = UserService(own_store.root)
            other.delete(USER)
            other.close()
        _wait_idle(server)
        assert http.get(f"/v1/users/{USER}/jobs/{job['job_id']}", headers=admin).status_code == 404
        assert server.jobs.get(job["job_id"]) is None
        metrics = http.get("/metrics", headers=admin).text
        assert 'tailorlm_training_jobs_total{state="cancelled"} 1.0' in metrics
        assert 'state="failed"' not in metrics
        assert server.store.current(USER) is None and not server.store.index.has_user(USER)
        served = http.post(
            "/v1/completions", json={"model": USER, "prompt": "hi", "max_tokens": 2}, headers=admin
        )
        assert served.status_code == 404
    assert not any(USER in str(p) for p in own_store.root.rglob("*"))
    service = UserService(own_store.root)
    service.index.checkpoint()
    service.close()
    assert files_holding(own_store.root, CANARY.encode()) == []


HTTP_TRIALS = int(os.environ.get("HTTP_RACE_TRIALS", 150))


def test_history_posts_racing_an_admin_delete_never_bring_the_user_back(own_store, tiny):
    """The reported race, over HTTP: a user's history posts (their own key) against the admin's DELETE of
    them, in seeded trials. Before tombstones a post landing after the delete put the user back with their
    history (2 of these 150 trials on the old code); now every trial ends with the user gone."""
    admin = {"Authorization": f"Bearer {own_store.admin}"}
    rng = random.Random(19)
    came_back = []
    seen: collections.Counter[int] = collections.Counter()
    with (
        background(serve_config(own_store.root, retrain=False), base=fresh(tiny)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
        concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool,
    ):
        for trial in range(HTTP_TRIALS):
            user_id = f"raced-{trial}"
            made = http.post("/v1/users", json={"user_id": user_id}, headers=admin)
            assert made.status_code == 201, made.text
            mine = {"Authorization": f"Bearer {made.json()['api_key']}"}

            def post(n: int, user_id=user_id, mine=mine) -> int:
                time.sleep(rng.uniform(0, 0.01))
                items = [{"input": f"{CANARY} {n}", "target": "yes", "item_id": f"i{n}"}]
                body = {"items": items, "retrain": False}
                return http.post(f"/v1/users/{user_id}/history", json=body, headers=mine).status_code

            posts = [pool.submit(post, n) for n in range(8)]
            time.sleep(rng.uniform(0, 0.01))
            gone = http.delete(f"/v1/users/{user_id}", headers=admin)
            assert gone.status_code == 200, gone.text
            codes = [future.result() for future in posts]
            assert set(codes) <= {202, 401, 404}, codes  # before the delete, or refused after it
            seen.update(codes)
            if server.store.index.has_user(user_id) or server.store.index.history(user_id):
                came_back.append(user_id)
        assert came_back == [], f"{len(came_back)} of {HTTP_TRIALS} users came back"
        assert seen[202] and seen[401] + seen[404], seen  # posts landed on both sides of the delete
    service = UserService(own_store.root)
    service.index.checkpoint()
    service.close()
    assert files_holding(own_store.root, CANARY.encode()) == []


def test_a_user_forgotten_by_another_process_leaves_the_servers_memory(own_store, tiny):
    """``tailorlm users delete`` beside a running server: the server's sweep resets the slot that held
    the user's module and drops the caches derived from history text, within a few sweeps."""
    user = "lora-user-1"
    config = serve_config(own_store.root, retrain=False, recipe="bm25", forget_sweep_seconds=0.2)
    with background(config, base=fresh(tiny)) as server:
        headers = {"Authorization": f"Bearer {own_store.keys[user]}"}
        body = {"model": user, "prompt": "I would shout.", "labels": ["yes", "no"]}
        assert (
            httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60).status_code
            == 200
        )
        resident = [key for manager in server.managers for key in manager.resident()]
        assert any(key.endswith(f":{user}") for key in resident) and server._builder is not None
        other = UserService(own_store.root)  # another process's view of the store
        other.delete(user)
        other.close()
        deadline = time.monotonic() + 10
        # The sweep clears the slots, then the caches: wait for both, since the test thread can look
        # between the two steps (CI did).
        while any(k.endswith(f":{user}") for m in server.managers for k in m.resident()):
            assert time.monotonic() < deadline, "the forgotten user's module stayed in memory"
            time.sleep(0.05)
        while server._builder is not None:  # its retriever had read the user's history
            assert time.monotonic() < deadline, "the prompt builder that read their history stayed"
            time.sleep(0.05)
        again = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)
        assert again.status_code == 401  # their keys went with them
