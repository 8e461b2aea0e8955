"""Users of every kind served together: concurrent requests share decode steps, and each answer equals
that user's module alone (the store's module in a single-kind engine, with the store's shared part for a
kind that has one)."""

from __future__ import annotations

import concurrent.futures

import httpx
from serve_helpers import fresh

from kind_helpers import ALL_KINDS
from tailorlm import kinds
from tailorlm.engine.engine import Engine
from tailorlm.engine.generation import DecodeConfig
from tailorlm.users.service import UserService


def alone(tiny, root, user_id: str, prompt: str, new_tokens: int) -> str:
    service = UserService(root)
    stored = service.store.get(user_id)
    engine = Engine(fresh(tiny), stored.spec, slots=2)
    engine.bank.write(1, stored.tensors)
    if kinds.of(stored.spec).has_shared_part:
        engine.bank.write_shared(service.shared_part(stored.spec))
    service.close()
    return engine.generate([prompt], [1], DecodeConfig(max_new_tokens=new_tokens))[0]


def test_a_mixed_batch_answers_each_user_as_alone(live, store_users, tiny):
    users = sorted(store_users.keys)  # two users of each kind
    prompts = {user: f"Question {i} for the model: what comes next?" for i, user in enumerate(users)}
    before = live.metrics.batch_size.collect()[0].samples

    def ask(user: str) -> str:
        answer = httpx.post(
            f"{live.url}/v1/completions",
            json={"model": user, "prompt": prompts[user], "max_tokens": 8, "temperature": 0},
            headers={"Authorization": f"Bearer {store_users.keys[user]}"},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
        answers = dict(zip(users, pool.map(ask, users), strict=True))
    for user in users:
        assert answers[user].strip() == alone(tiny, store_users.root, user, prompts[user], 8), user
    # Rows really shared steps: some decode step held more than one row.
    after = {s.name + str(s.labels): s.value for s in live.metrics.batch_size.collect()[0].samples}
    steps = after["tailorlm_batch_size_count{}"] - {s.name + str(s.labels): s.value for s in before}.get(
        "tailorlm_batch_size_count{}", 0
    )
    rows = after["tailorlm_batch_size_sum{}"] - {s.name + str(s.labels): s.value for s in before}.get(
        "tailorlm_batch_size_sum{}", 0
    )
    assert rows / steps > 1.5, (rows, steps)
    kinds_in_use = {store_users.kinds[user] for user in users}
    assert kinds_in_use == set(ALL_KINDS) and "collab" in kinds_in_use
