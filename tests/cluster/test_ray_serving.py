"""``tailorlm serve --backend ray`` with 2 replicas on a local Ray instance: the stock ``openai`` client
gets the same greedy answers as from the single-process server, a user's requests always land on the
same replica (the front's header and the replica's own count agree), each replica batches many users'
requests together, and bad requests get the same 4xx bodies."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
import torch
from serve_helpers import build_store, fresh, serve_config

from kind_helpers import ALL_KINDS
from tailorlm.data import load_task
from tailorlm.methods.blend_part import Blender, ItemStatistics, part_for
from tailorlm.serve.app import REPLICA_HEADER
from tailorlm.serve.run import background
from tailorlm.users.service import UserService

pytestmark = pytest.mark.xdist_group("ray")

REPLICAS = 2


@pytest.fixture(scope="module")
def store_users(tmp_path_factory, tiny):
    users = build_store(tmp_path_factory.mktemp("store"), tiny)
    # A blend part whose model source is the shared model: item requests score at slot 0 of a replica.
    task = load_task("verbagg", seed=0)
    statistics = ItemStatistics.fit(task, task.users[:4])
    blender = Blender((*statistics.sources, "model"), torch.ones(4), torch.full((4,), 0.5), torch.zeros(3))
    folder = tmp_path_factory.mktemp("blend") / "blend-part-plain"
    part_for(task, statistics, blender, None, "shared").save(folder)
    service = UserService(users.root)
    service.configure(blend=folder)
    service.close()
    return users


@pytest.fixture(scope="module")
def fronts(ray_instance, store_users, tiny):
    """(single-process server URL, Ray Serve URL) over the same store."""
    from tailorlm.cluster import serving

    config = serve_config(store_users.root, retrain=False)
    with (
        serving.serving(serve_config(store_users.root, retrain=False), REPLICAS) as ray_url,
        background(config, base=fresh(tiny)) as local,
    ):
        yield local.url, ray_url


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def answers(url: str, user: str, key: str) -> list[str]:
    api = client(url, key)
    completion = api.completions.create(model=user, prompt="The weather today", max_tokens=6, temperature=0)
    messages = [{"role": "user", "content": "Tell me a story"}]
    chat = api.chat.completions.create(model=user, messages=messages, max_tokens=6, temperature=0)
    stream = api.chat.completions.create(
        model=user, messages=messages, max_tokens=6, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    return [completion.choices[0].text, chat.choices[0].message.content, streamed]


def test_ray_serve_answers_as_one_process_does(fronts, store_users):
    """One test over one deployment (deploying takes ~20 s; xdist may run this file's tests apart, and a
    module fixture would then deploy twice). Forgetting comes last: it deletes a user from the store."""
    check_same_answers_one_replica_per_user_shared_batches(*fronts, store_users)
    check_bad_requests_get_the_same_answers(*fronts, store_users)
    check_blend_answers_the_same(*fronts, store_users)
    check_forgetting_clears_the_replicas(fronts[1], store_users)


def check_same_answers_one_replica_per_user_shared_batches(local, ray_url, store_users):
    from tailorlm.cluster import serving

    for kind in ALL_KINDS:  # a user of each kind (collab with its shared part), on either replica
        user = f"{kind}-user-0"
        key = store_users.keys[user]
        assert answers(ray_url, user, key) == answers(local, user, key), user

    def placed(user: str) -> str:
        body = {"model": user, "prompt": "Once upon", "max_tokens": 8, "temperature": 0}
        headers = {"Authorization": f"Bearer {store_users.keys[user]}"}
        answer = httpx.post(f"{ray_url}/v1/completions", json=body, headers=headers, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.headers[REPLICA_HEADER]

    users = list(store_users.keys) * 3
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        routes = list(pool.map(placed, users))
    home = {}
    for user, replica in zip(users, routes, strict=True):
        assert home.setdefault(user, replica) == replica, f"{user} moved between replicas"
        assert replica == serving.home_replica(user, serving.replica_names(REPLICAS))
    assert sorted(set(home.values())) == serving.replica_names(REPLICAS)  # both replicas serve someone

    stats = serving.replica_stats(REPLICAS)
    for replica in stats:
        mine = {user for user, name in home.items() if name == replica["name"]}
        assert set(replica["served"]) == mine  # each replica saw only its own users
        answered = sum(3 for user in mine if user.endswith("-0"))  # the three answers compared above
        assert sum(replica["served"].values()) == answered + 3 * len(mine)  # + 3 placed requests each
    assert max(replica["mean_batch"] for replica in stats) > 1.0  # users shared decode steps


def check_bad_requests_get_the_same_answers(local, ray_url, store_users):
    user, other = "lora-user-0", "ia3-user-0"
    key = store_users.keys[user]
    cases = [
        ("POST", "/v1/completions", {"model": user, "prompt": "hi"}, "not-a-key"),
        ("POST", "/v1/completions", {"model": other, "prompt": "hi"}, key),
        ("POST", "/v1/completions", {"model": "nobody", "prompt": "hi"}, key),
        ("POST", "/v1/completions", {"model": user, "prompt": "hi", "max_tokens": 0}, key),
        ("POST", "/v1/completions", {"model": user}, key),
        ("POST", "/v1/completions", {"model": user, "prompt": "hi", "max_tokens": 5000}, key),
        ("GET", "/v1/users", None, key),
        ("GET", "/v1/no-such-route", None, key),
    ]
    for method, path, body, presented in cases:
        replies = [
            httpx.request(
                method,
                f"{url}{path}",
                json=body,
                headers={"Authorization": f"Bearer {presented}"},
                timeout=60,
            )
            for url in (local, ray_url)
        ]
        assert 400 <= replies[0].status_code < 500, (path, body, replies[0].text)
        assert [r.status_code for r in replies] == [replies[0].status_code] * 2, (path, body)
        assert replies[1].json() == replies[0].json(), (path, body)


def check_blend_answers_the_same(local, ray_url, store_users):
    """A label request naming an item gets the same blended answer from either front (the blend runs in
    the front, the shared model's scores on the user's home replica); a mismatched label set is the same
    400."""
    labels = ["no", "perhaps", "yes"]

    def both(user: str, body: dict) -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {store_users.keys[user]}"}
        return [
            httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
            for url in (local, ray_url)
        ]

    for user in ("lora-user-0", "ia3-user-1"):
        body = {
            "model": user,
            "prompt": "A bus fails to stop for me.",
            "labels": labels,
            "item": "S1WantCurse",
        }
        replies = both(user, body)
        assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
        local_choice, ray_choice = (r.json()["choices"][0] for r in replies)
        assert ray_choice["text"] == local_choice["text"]
        assert [ray_choice["label_scores"][x] for x in labels] == pytest.approx(
            [local_choice["label_scores"][x] for x in labels], abs=1e-4
        )
        refused = both(user, {**body, "labels": labels[:2]})
        assert [r.status_code for r in refused] == [400, 400] and refused[0].json() == refused[1].json()


def check_forgetting_clears_the_replicas(ray_url, store_users):
    user = "lora-user-1"
    served = client(ray_url, store_users.keys[user]).completions.create(model=user, prompt="hi", max_tokens=2)
    assert served.choices  # now resident on their home replica
    admin = {"Authorization": f"Bearer {store_users.admin}"}
    forgotten = httpx.delete(f"{ray_url}/v1/users/{user}", headers=admin, timeout=60)
    assert forgotten.status_code == 200, forgotten.text
    assert forgotten.json()["slots_cleared"] >= 1
    body = {"model": user, "prompt": "hi", "max_tokens": 2}
    again = httpx.post(
        f"{ray_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {store_users.keys[user]}"}
    )
    assert again.status_code == 401
