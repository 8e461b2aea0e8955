"""``kill -9`` of the training worker, and of the server with its worker, during a retrain: the store stays
consistent (every indexed version's checksum holds, the user has a current version) and a restarted
server serves the user with the old or the new version."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import build_store

from tailorlm.serve.run import free_port, wait_healthy
from tailorlm.store.store import ModuleStore

USER = "lora-user-0"


def start_server(root, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "tailorlm.cli",
        "serve",
        "--store",
        str(root),
        "--port",
        str(port),
        "--slots",
        "2",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", lambda: process.poll() is None, timeout=120)
    except RuntimeError as error:
        process.kill()
        raise AssertionError(f"{error}: {process.stderr.read().decode()[-2000:]}") from None
    return process


def assert_consistent(root) -> None:
    store = ModuleStore(root)
    try:
        for user in store.index.user_ids():
            versions = store.versions(user)
            for record in versions:
                store.get(user, record.version)  # raises on a missing or damaged file
            if versions:
                assert store.current(user) is not None
        assert store.has(USER)
    finally:
        store.close()


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def post_history(url: str, key: str, start: int) -> dict:
    items = [{"input": f"shifted item {i}: agree?", "target": "no"} for i in range(start, start + 6)]
    answer = httpx.post(
        f"{url}/v1/users/{USER}/history",
        json={"items": items},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert answer.status_code == 202, answer.text
    return answer.json()["job"]


@pytest.mark.parametrize("delay", [1.5, 4.0])
def test_kill_9_during_a_retrain_leaves_the_store_consistent(tmp_path, tiny, delay):
    users = build_store(tmp_path / "store", tiny, per_kind=1)
    key = users.keys[USER]
    port = free_port()
    server = start_server(users.root, port)
    url = f"http://127.0.0.1:{port}"
    try:
        job = post_history(url, key, 0)
        time.sleep(delay)
        kill(job["pid"])  # the worker alone
        status = httpx.get(
            f"{url}/v1/users/{USER}/jobs/{job['job_id']}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        for _ in range(100):
            if status.json()["state"] != "running":
                break
            time.sleep(0.1)
            status = httpx.get(
                f"{url}/v1/users/{USER}/jobs/{job['job_id']}",
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
        assert status.json()["state"] in ("failed", "succeeded")
        assert_consistent(users.root)

        job = post_history(url, key, 100)
        time.sleep(delay)
        kill(server.pid)  # the server and its worker together
        kill(job["pid"])
        server.wait(timeout=30)
    finally:
        kill(server.pid)
    assert_consistent(users.root)

    restarted = start_server(users.root, port)
    try:
        answer = httpx.post(
            f"{url}/v1/completions",
            json={"model": USER, "prompt": "hello", "max_tokens": 3},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
    finally:
        restarted.terminate()
        restarted.wait(timeout=30)


ORPHAN_DEADLINE = 60.0  # seconds; a worker that survives its server writes only if it outlives this


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no parent reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_dies_with_its_killed_server_and_writes_nothing_after(tmp_path, tiny):
    """Only the server is killed: its worker, mid-retrain, must notice and exit at once, not finish
    the retrain and write a version for a server that is gone."""
    users = build_store(tmp_path / "store", tiny, per_kind=1)
    key = users.keys[USER]
    port = free_port()
    server = start_server(users.root, port)
    workers = []
    try:
        job = post_history(f"http://127.0.0.1:{port}", key, 0)
        workers.append(job["pid"])
        assert alive(job["pid"])
        time.sleep(2.0)  # the worker has started (loading its base, or training)
        assert alive(job["pid"]), "the retrain finished before the server could be killed"
        before = [v.version for v in ModuleStore(users.root).versions(USER)]
        kill(server.pid)
        server.wait(timeout=30)
        # A training worker notices within 0.1 s; one still importing its modules (seconds on a busy
        # machine) notices the moment it starts, before it reads or writes anything.
        deadline = time.monotonic() + ORPHAN_DEADLINE
        while alive(job["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [pid for pid in workers if alive(pid)]
        assert survivors == [], f"workers outlived their server by {ORPHAN_DEADLINE} s: {survivors}"
        time.sleep(1.0)
    finally:
        kill(server.pid)
        for pid in workers:
            kill(pid)
    store = ModuleStore(users.root)
    assert [v.version for v in store.versions(USER)] == before  # nothing written after the kill
    store.close()
    assert_consistent(users.root)
