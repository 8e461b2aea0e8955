"""The server's recipe: a label request's prompt is the task's item, written into the benchmark's prompt
(the store's task template, the user's retrieved history under a retrieval recipe), and its label scores
equal the engine's label scores for that prompt and that user's module alone."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_helpers import build_store, fresh, serve_config

from tailorlm.data.schema import Example
from tailorlm.engine.engine import Engine
from tailorlm.methods.recipes import PromptBuilder, Recipe
from tailorlm.methods.retrieval import BM25Retriever
from tailorlm.serve import server as server_module
from tailorlm.serve.config import recipe_from_name
from tailorlm.serve.run import background
from tailorlm.store.store import ModuleStore
from tailorlm.users.service import PROFILE_FILE, UserService

USER = "bottleneck-user-1"
LABELS = ["yes", "no", "perhaps"]


def ask(server, key: str, **fields) -> dict:
    body = {"model": USER, "prompt": "I would shout at the driver.", "labels": LABELS, **fields}
    answer = httpx.post(
        f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.parametrize("recipe", ["plain", "bm25"])
def test_label_requests_are_asked_as_the_benchmark_asks(store_users, tiny, recipe, monkeypatch):
    key = store_users.keys[USER]
    with background(serve_config(store_users.root, retrain=False, recipe=recipe), base=fresh(tiny)) as server:
        built = []
        monkeypatch.setattr(
            server_module, "PromptBuilder", lambda *a, **o: built.append(1) or PromptBuilder(*a, **o)
        )
        templated = ask(server, key)
        raw = ask(server, key, raw_prompt=True)
        again = ask(server, key)
        assert again["choices"] == templated["choices"]
        assert len(built) == 1  # the prompt builder (the task, the retriever) is made once per server
    service = UserService(store_users.root)
    retriever = BM25Retriever() if recipe == "bm25" else None
    builder = PromptBuilder(service.task(), tiny.tokenizer, recipe_from_name(recipe), retriever=retriever)
    user = service.data_user(USER)
    prompt = builder.build(user, Example("request", "I would shout at the driver.", "", ())).text
    if recipe == "bm25":
        assert any(item.text in prompt for item in user.history)  # the user's own history was retrieved
    stored = ModuleStore(store_users.root).get(USER)
    engine = Engine(fresh(tiny), stored.spec, slots=2)
    engine.bank.write(1, stored.tensors)
    expected = dict(zip(LABELS, engine.score_labels([prompt], [1], LABELS)[0], strict=True))
    got = templated["choices"][0]["label_scores"]
    assert got == pytest.approx(expected, abs=1e-4)
    assert templated["usage"]["prompt_tokens"] == len(
        tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )
    assert raw["usage"]["prompt_tokens"] < templated["usage"]["prompt_tokens"]
    service.close()


def test_recipe_names():
    assert recipe_from_name("none") is None
    assert recipe_from_name("plain") == Recipe()
    assert recipe_from_name("shots+bm25") == Recipe(shots=True, retrieval="bm25")
    for bad in ("bm25+dense", "magic", ""):
        with pytest.raises(ValueError):
            recipe_from_name(bad)


def test_an_unexpected_failure_is_a_500_and_the_server_goes_on(live, store_users, monkeypatch):
    def broken(user_id: str, item: str) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(live, "task_prompt", broken)
    key = store_users.keys[USER]
    answer = httpx.post(
        f"{live.url}/v1/completions",
        json={"model": USER, "prompt": "x", "labels": ["a", "b"]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert answer.status_code == 500
    assert answer.json()["error"]["type"] == "server_error"
    assert answer.headers["x-should-retry"] == "false"
    fine = httpx.post(
        f"{live.url}/v1/completions",
        json={"model": USER, "prompt": "x", "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert fine.status_code == 200


def test_the_profile_recipe_serves_the_profile_training_wrote(tmp_path, tiny):
    users = build_store(tmp_path / "store", tiny, per_kind=1)
    user = "lora-user-0"
    key = users.keys[user]
    with background(serve_config(users.root, retrain=False, recipe="profile"), base=fresh(tiny)) as server:
        missing = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": user, "prompt": "I would shout.", "labels": LABELS},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert missing.status_code == 409 and missing.json()["error"]["code"] == "profile_missing"
        service = UserService(users.root, load_base=lambda: fresh(tiny))
        service.write_profiles([user])
        # The tiny model's profile may be empty (then no profile block is shown): give it a known text.
        written = service.cache_folder(user) / PROFILE_FILE
        written.write_text(
            json.dumps({**json.loads(written.read_text()), "text": "Tends to shout at drivers."})
        )
        profile = service.profile(user)
        service.close()
        served = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": user, "prompt": "I would shout.", "labels": LABELS},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert served.status_code == 200, served.text
        prompt = server.task_prompt(user, "I would shout.")
        service = UserService(users.root)
        plain = PromptBuilder(service.task(), tiny.tokenizer, Recipe()).build(
            service.data_user(user), Example("request", "I would shout.", "", ())
        )
        service.close()
    assert profile.text in prompt and prompt != plain.text  # the profile block is in, whatever its text
    assert served.json()["usage"]["prompt_tokens"] == len(
        tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )
