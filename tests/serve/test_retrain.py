"""Behaviour shift: history posted over HTTP retrains the user in a worker process from their current
module while other users are served; the new version then answers, and a request that started on the old
version finished on it."""

from __future__ import annotations

import time

import httpx
import pytest
from serve_helpers import build_store, fresh, serve_config

from tailorlm.serve.run import background

USER = "lora-user-0"


@pytest.fixture
def own_store(tmp_path, tiny):
    return build_store(tmp_path / "store", tiny, per_kind=1)


def test_posted_history_retrains_in_the_background(own_store, tiny):
    headers = {"Authorization": f"Bearer {own_store.keys[USER]}"}
    others = {u: {"Authorization": f"Bearer {k}"} for u, k in own_store.keys.items() if u != USER}
    with (
        background(serve_config(own_store.root), base=fresh(tiny)) as server,
        httpx.Client(base_url=server.url, timeout=120) as http,
    ):
        old = server.store.current(USER).version
        first = http.post(
            "/v1/completions", json={"model": USER, "prompt": "hi", "max_tokens": 2}, headers=headers
        )
        assert first.status_code == 200
        items = [{"input": f"new behaviour {i}: do you agree?", "target": "yes"} for i in range(6)]
        posted = http.post(f"/v1/users/{USER}/history", json={"items": items}, headers=headers)
        assert posted.status_code == 202, posted.text
        job = posted.json()["job"]
        assert job["state"] == "running" and job["user_id"] == USER

        served_while_training = 0
        deadline = time.monotonic() + 240
        while True:
            status = http.get(f"/v1/users/{USER}/jobs/{job['job_id']}", headers=headers).json()
            if status["state"] != "running":
                break
            assert time.monotonic() < deadline, "the retrain did not finish in time"
            for user, auth in others.items():
                answer = http.post(
                    "/v1/completions", json={"model": user, "prompt": "hi", "max_tokens": 2}, headers=auth
                )
                assert answer.status_code == 200
                served_while_training += 1
        assert status["state"] == "succeeded", status
        assert served_while_training > 0
        new = server.store.current(USER)
        assert status["version"] == new.version > old
        assert new.data_fingerprint is not None

        after = http.post(
            "/v1/completions", json={"model": USER, "prompt": "hi", "max_tokens": 2}, headers=headers
        )
        assert after.status_code == 200
        bank = next(i for i, b in enumerate(server.engine.banks) if b.kind.name == "lora")
        assert server.managers[bank].slot_of(f"{new.version}:{USER}") is not None
        metrics = http.get("/metrics", headers={"Authorization": f"Bearer {own_store.admin}"}).text
        assert 'tailorlm_training_jobs_total{state="succeeded"} 1.0' in metrics


def test_a_request_keeps_the_version_it_started_on(own_store, tiny):
    """A retrain landing mid-generation: the running row stays on its pinned slot (old version); the next
    request gets the new version from another slot."""
    with background(serve_config(own_store.root, retrain=False), base=fresh(tiny)) as server:
        scheduler = server.scheduler
        bank = next(i for i, b in enumerate(server.engine.banks) if b.kind.name == "lora")
        manager = server.managers[bank]
        old = server.store.current(USER)
        stored = server.store.get(USER)
        with manager.pinned([f"{old.version}:{USER}"]) as placed:  # as an in-flight request would
            new = server.store.put(
                USER,
                stored.spec,
                {n: t * 1.5 for n, t in stored.tensors.items()},
                model=tiny.model,
                base_name=None,
            )
            answer = httpx.post(
                f"{server.url}/v1/completions",
                json={"model": USER, "prompt": "hi", "max_tokens": 2},
                headers={"Authorization": f"Bearer {own_store.keys[USER]}"},
                timeout=60,
            )
            assert answer.status_code == 200
            new_slot = manager.slot_of(f"{new.version}:{USER}")
            assert new_slot is not None and new_slot != placed[f"{old.version}:{USER}"]
            assert not manager.bank.is_identity(placed[f"{old.version}:{USER}"])  # still the old module
        assert scheduler.pending() == 0


def test_users_waiting_for_the_worker_train_together(own_store, tiny):
    """One worker at a time: the first user's retrain runs alone, the two who post meanwhile wait and
    then train together in one worker process; all three get a new version."""
    users = ["lora-user-0", "ia3-user-0", "bottleneck-user-0"]
    with (
        background(serve_config(own_store.root, training_workers=1), base=fresh(tiny)) as server,
        httpx.Client(base_url=server.url, timeout=120) as http,
    ):
        before = {u: server.store.current(u).version for u in users}
        jobs = []
        for user in users:
            items = [{"input": f"{user} changed {i}: agree?", "target": "yes"} for i in range(5)]
            answer = http.post(
                f"/v1/users/{user}/history",
                json={"items": items},
                headers={"Authorization": f"Bearer {own_store.keys[user]}"},
            )
            assert answer.status_code == 202
            jobs.append(answer.json()["job"])
        assert [j["state"] for j in jobs] == ["running", "queued", "queued"]
        deadline = time.monotonic() + 300
        while True:
            done = [server.jobs.get(j["job_id"]) for j in jobs]
            if all(j.state in ("succeeded", "failed") for j in done):
                break
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert [j.state for j in done] == ["succeeded"] * 3, [j.error for j in done]
        assert done[1].pid == done[2].pid != done[0].pid
        assert all(server.store.current(u).version > before[u] for u in users)
