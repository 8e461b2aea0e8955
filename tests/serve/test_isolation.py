"""One request's failure stays with it: a prompt that makes its prefill or its label scoring fail gets a
500 that says only that, the requests batched with it get the answers they get alone, everything it held
(pins, queue places, rows) is released, and a stalled engine loop is reported by /health and /metrics."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest
from serve_helpers import fresh, serve_config, wait_settled

from tailorlm.serve.run import background
from tailorlm.serve.scheduler import SchedulerConfig

USERS = ["lora-user-0", "ia3-user-0", "prompt-user-0", "bottleneck-user-1"]
POISON = "poison pill"


@pytest.fixture(scope="module")
def isolated(store_users, tiny):
    # A long arrival window, so concurrent requests are prefilled (and scored) in one batch.
    config = serve_config(
        store_users.root,
        retrain=False,
        scheduler=SchedulerConfig(max_batch=8, wait_ms=300.0, max_queue=64, watchdog_seconds=0.5),
    )
    with background(config, base=fresh(tiny)) as server:
        yield server


def post(server, keys, user: str, prompt: str, **fields) -> httpx.Response:
    body = {"model": user, "prompt": prompt, "max_tokens": 6, "temperature": 0, **fields}
    headers = {"Authorization": f"Bearer {keys[user]}"}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)


def poisoned(server, method: str, is_poison) -> None:
    """Make ``method`` of the engine (or running batch) fail whenever a call includes a poisoned input."""
    owner = server.scheduler.running if method == "add" else server.engine
    original = getattr(owner, method)

    def failing(first, *rest, **options):
        if is_poison(first):
            raise RuntimeError("/secret/path/module.safetensors: injected failure")
        return original(first, *rest, **options)

    setattr(owner, method, failing)
    return lambda: setattr(owner, method, original)


@pytest.mark.parametrize("labels", [None, ["yes", "no"]], ids=["prefill", "scoring"])
def test_a_failing_request_fails_alone(isolated, store_users, labels):
    keys = store_users.keys
    extra = {"labels": labels, "raw_prompt": True} if labels else {}
    alone = {user: post(isolated, keys, user, f"hello {user}", **extra).json() for user in USERS}
    if labels:
        poison_ids = None
        restore = poisoned(isolated, "score_labels", lambda prompts: any(POISON in p for p in prompts))
    else:
        poison_ids = isolated.prompt_tokenizer(POISON, add_special_tokens=False)["input_ids"]
        restore = poisoned(isolated, "add", lambda rows: any(r.prompt_ids == poison_ids for r in rows))
    try:
        with concurrent.futures.ThreadPoolExecutor(len(USERS) + 1) as pool:
            bad = pool.submit(post, isolated, keys, USERS[0], POISON, **extra)
            good = {user: pool.submit(post, isolated, keys, user, f"hello {user}", **extra) for user in USERS}
            bad = bad.result()
            good = {user: answer.result() for user, answer in good.items()}
    finally:
        restore()
    assert bad.status_code == 500, bad.text
    assert "secret" not in bad.text and "injected" not in bad.text  # the detail stays in the log
    for user, answer in good.items():
        assert answer.status_code == 200, answer.text
        mine, reference = answer.json()["choices"][0], alone[user]["choices"][0]
        assert mine["text"] == reference["text"]
        if labels:
            assert mine["label_scores"] == pytest.approx(reference["label_scores"], abs=1e-4)
    wait_settled(isolated)


def test_a_stalled_loop_is_reported(isolated, store_users):
    stalls = isolated.metrics.watchdog_stalls._value.get()
    blocker = threading.Thread(target=isolated.scheduler.run_here, args=(lambda: time.sleep(3.0),))
    blocker.start()
    time.sleep(0.1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, isolated, store_users.keys, USERS[1], "are you there")
        deadline = time.monotonic() + 2.5
        health = httpx.get(f"{isolated.url}/health", timeout=10)
        while health.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
            health = httpx.get(f"{isolated.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "stalled", health.text
        assert waiting.result().status_code == 200  # served once the loop moves again
    blocker.join()
    assert isolated.metrics.watchdog_stalls._value.get() == stalls + 1
    assert httpx.get(f"{isolated.url}/health", timeout=10).status_code == 200
    wait_settled(isolated)
