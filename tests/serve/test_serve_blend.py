"""The stacked blend served: a store that keeps a blend part answers a label request naming an item with
the blend of the statistics (the user's row folded in from their history now) and the model's label
scores, exactly as the part computes it: the shared model's (users need no module), each user's own
module's, or none (the statistics alone, no model run); bad requests are 400s that name the field, a
model that is not the caller's a 404, and everyone else is served as before."""

from __future__ import annotations

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import fresh, serve_config

from tailorlm import models
from tailorlm.data import load_task
from tailorlm.data.schema import Example
from tailorlm.engine.engine import Engine
from tailorlm.kinds.lora import LoraSpec
from tailorlm.methods.baselines import label_by_rule
from tailorlm.methods.blend_part import Blender, ItemStatistics, part_for
from tailorlm.methods.recipes import PromptBuilder, Recipe
from tailorlm.serve.protocol import MAX_ITEM_CHARS
from tailorlm.serve.run import background
from tailorlm.store.index import HistoryRecord
from tailorlm.users.errors import UserError
from tailorlm.users.history import user_of
from tailorlm.users.service import UserService

USERS = ["1", "2", "3"]


def _part(folder, model: str | None):
    """A verbagg blend part whose model source is ``model`` (fitted over no task adapter, as the stores
    here merge none)."""
    task = load_task("verbagg", seed=0)
    statistics = ItemStatistics.fit(task, task.users[:4])
    sources = (*statistics.sources, *(("model",) if model else ()))
    cold, warm = torch.tensor([0.5, 0.2, 0.3, 1.0]), torch.tensor([0.3, 0.1, 0.2, -0.5])
    blender = Blender(sources, cold[: len(sources)], warm[: len(sources)], torch.tensor([0.1, 0.0, -0.1]))
    part_for(task, statistics, blender, None, model).save(folder)
    return folder


@pytest.fixture(scope="module")
def part_folder(tmp_path_factory):
    """A part whose model source is each user's own module."""
    return _part(tmp_path_factory.mktemp("blend") / "blend-part-plain", "module")


@pytest.fixture
def store(tmp_path, tiny, part_folder):
    service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", base_model=models.TINY_MODEL)
    service.import_task("verbagg", users=USERS, kind="label-bias")
    assert sorted(service.train().trained) == USERS
    service.configure(blend=part_folder)
    yield service
    service.close()


def _ask(server, key: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def test_a_request_naming_an_item_is_answered_by_the_blend(store, tiny):
    task = load_task("verbagg", seed=0)
    labels = list(task.labels)
    example = task.user("2").test[0]
    keys = {user: store.issue_key(user) for user in USERS}
    part = store.blend_part()
    with background(serve_config(store.root, retrain=False), base=fresh(tiny)) as server:
        plain = _ask(server, keys["2"], {"model": "2", "prompt": example.text, "labels": labels})
        asked = {"model": "2", "prompt": example.text, "labels": labels[::-1], "item": example.item_key}
        blended = _ask(server, keys["2"], asked)
        unknown = _ask(server, keys["2"], {**asked, "item": "an item nobody answered"})
        # New history changes the user's row at once (no training): it is folded in per request.
        store.add_history("2", [HistoryRecord("extra", "x", labels[2], "train", item_key=example.item_key)])
        after = _ask(server, keys["2"], asked)
    for response in (plain, blended, unknown, after):
        assert response.status_code == 200, response.text
    model = plain.json()["choices"][0]["label_scores"]
    model = torch.log_softmax(torch.tensor([model[label] for label in labels]), dim=-1)

    def expected(item: str, history) -> tuple[str, list[float]]:
        row = part.statistics.row(user_of("2", history).train)
        found = part.distribution(row, item, model)
        return label_by_rule(part.rule, labels, found.exp().tolist()), found.tolist()

    before = [r for r in store.history("2") if r.item_id != "extra"]
    for response, item, history in (
        (blended, example.item_key, before),
        (unknown, "an item nobody answered", before),
        (after, example.item_key, store.history("2")),
    ):
        choice = response.json()["choices"][0]
        answer, scores = expected(item, history)
        assert list(choice["label_scores"]) == labels[::-1]  # in the request's order
        assert [choice["label_scores"][label] for label in labels] == pytest.approx(scores, abs=1e-5)
        assert choice["text"] == answer
    assert blended.json()["choices"][0]["label_scores"] != after.json()["choices"][0]["label_scores"]


def test_bad_blend_requests_are_400s_naming_the_field_and_others_are_served(store, tiny, tmp_path):
    labels = list(store.task().labels)
    key = store.issue_key("1")
    with background(serve_config(store.root, retrain=False), base=fresh(tiny)) as server:
        cases = {
            "item": {"model": "1", "prompt": "p", "item": "x"},  # no labels
            "labels": {"model": "1", "prompt": "p", "labels": labels[:2], "item": "x"},
            "item ": {"model": "1", "prompt": "p", "labels": labels, "item": ""},
            "item  ": {"model": "1", "prompt": "p", "labels": labels, "item": "x" * (MAX_ITEM_CHARS + 1)},
            "item   ": {"model": "1", "prompt": "p", "labels": labels, "item": 7},
        }
        for field, body in cases.items():
            response = _ask(server, key, body)
            assert response.status_code == 400, (field, response.text)
            error = response.json()["error"]
            assert field.strip() in (error["message"] + str(error["param"])), (field, error)
        fine = _ask(server, key, {"model": "1", "prompt": "p", "labels": labels, "item": "x"})
        assert fine.status_code == 200, fine.text


def test_a_store_without_a_blend_part_refuses_an_item_and_a_mismatched_part_is_refused(
    tmp_path, tiny, part_folder
):
    service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", base_model=models.TINY_MODEL)
    service.import_task("verbagg", users=["1"], kind="label-bias")
    service.train()
    key = service.issue_key("1")
    labels = list(service.task().labels)
    with background(serve_config(service.root, retrain=False), base=fresh(tiny)) as server:
        refused = _ask(server, key, {"model": "1", "prompt": "p", "labels": labels, "item": "x"})
        served = _ask(server, key, {"model": "1", "prompt": "p", "labels": labels})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "blend_unavailable"
    assert served.status_code == 200
    other = UserService(tmp_path / "bfi", load_base=lambda: fresh(tiny))
    other.configure(task="bfi", base_model=models.TINY_MODEL)
    with pytest.raises(UserError, match="labels"):
        other.configure(blend=part_folder)  # verbagg's labels
    with pytest.raises(UserError, match="blend part"):
        other.configure(blend=tmp_path)  # not a part
    assert other.settings().blend is None
    service.close()
    other.close()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(item=st.text(min_size=1, max_size=40))
def test_any_item_text_is_answered(item, served_blend):
    """Any UTF-8 item key of up to the bound is answered (an unknown one by the model and the user's
    prior alone), never a 500."""
    server, key, labels = served_blend
    response = _ask(server, key, {"model": "1", "prompt": "p", "labels": labels, "item": item})
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        assert response.status_code == 400
        return
    assert response.status_code == 200, response.text
    assert set(response.json()["choices"][0]["label_scores"]) == set(labels)


@pytest.fixture(scope="module")
def served_blend(tmp_path_factory, tiny, part_folder):
    root = tmp_path_factory.mktemp("served")
    service = UserService(root / "store", load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", base_model=models.TINY_MODEL)
    service.import_task("verbagg", users=["1"], kind="label-bias")
    service.train()
    service.configure(blend=part_folder)
    key = service.issue_key("1")
    labels = list(service.task().labels)
    service.close()
    with background(serve_config(root / "store", retrain=False), base=fresh(tiny)) as server:
        yield server, key, labels


@pytest.mark.parametrize("model", ["shared", None])
def test_users_without_a_module_are_served_the_blend_of_the_shared_model_or_of_the_statistics(
    tmp_path, tiny, model
):
    """A part whose model source is the shared model scores at slot 0, so a user who has history but no
    module of their own is answered; a part without a model source answers from the statistics alone. A
    user's key on another user's model is the usual 404, and a forgotten user is not served."""
    folder = _part(tmp_path / "part", model)
    service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", base_model=models.TINY_MODEL, blend=folder)
    service.import_task("verbagg", users=USERS)  # imported, never trained: no modules
    assert all(service.store.current(user) is None for user in USERS)
    keys = {user: service.issue_key(user) for user in USERS}
    admin = service.issue_key(None, admin=True)
    task = load_task("verbagg", seed=0)
    labels = list(task.labels)
    example = task.user("3").test[0]
    asked = {"model": "3", "prompt": example.text, "labels": labels, "item": example.item_key}
    with background(serve_config(service.root, retrain=False), base=fresh(tiny)) as server:
        answered = _ask(server, keys["3"], asked)
        chat = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                **{k: v for k, v in asked.items() if k != "prompt"},
                "messages": [{"role": "user", "content": example.text}],
            },
            headers={"Authorization": f"Bearer {keys['3']}"},
            timeout=60,
        )
        not_theirs = _ask(server, keys["1"], asked)
        no_item = _ask(server, keys["3"], {k: v for k, v in asked.items() if k != "item"})
        admin_asks = _ask(server, admin, {**asked, "model": "2"})
        service.delete("2")
        forgotten = _ask(server, admin, {**asked, "model": "2"})
    assert answered.status_code == 200 and chat.status_code == 200, (answered.text, chat.text)
    assert not_theirs.status_code == 404 and not_theirs.json()["error"]["code"] == "model_not_found"
    assert no_item.status_code == 404  # without the blend a label request needs the user's module
    assert admin_asks.status_code == 200, admin_asks.text
    assert forgotten.status_code == 404 and forgotten.json()["error"]["code"] == "model_not_found"
    part = service.blend_part()
    row = part.statistics.row(user_of("3", service.history("3")).train)
    scores = None
    if model == "shared":
        builder = PromptBuilder(service.task(), tiny.tokenizer, Recipe())
        prompt = builder.build(service.data_user("3"), Example("request", example.text, "", ())).text
        engine = Engine(fresh(tiny), LoraSpec(), slots=2)
        scores = torch.log_softmax(torch.tensor(engine.score_labels([prompt], [0], labels)[0]), dim=-1)
    expected = part.distribution(row, example.item_key, scores)
    for response in (answered, chat):
        choice = response.json()["choices"][0]
        got = choice["label_scores"]
        assert [got[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-4)
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert text == label_by_rule(part.rule, labels, expected.exp().tolist())
    service.close()


def test_concurrent_blend_and_plain_requests_each_get_their_own_answer(store, tiny):
    """Many users' blended and plain label requests at once (blended ones fold their user in on worker
    threads while others score): every answer is 200 and equals the same request asked alone."""
    import concurrent.futures

    task = load_task("verbagg", seed=0)
    labels = list(task.labels)
    keys = {user: store.issue_key(user) for user in USERS}
    bodies = []
    for user in USERS:
        for example in task.user(user).test[:2]:
            plain = {"model": user, "prompt": example.text, "labels": labels}
            bodies += [plain, {**plain, "item": example.item_key}]
    with background(serve_config(store.root, retrain=False), base=fresh(tiny)) as server:

        def ask(body: dict) -> dict:
            response = _ask(server, keys[body["model"]], body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]

        alone = [ask(body) for body in bodies]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, bodies * 3))
    for index, choice in enumerate(together):
        expected = alone[index % len(bodies)]
        assert choice["text"] == expected["text"]
        assert choice["label_scores"] == pytest.approx(expected["label_scores"], abs=1e-4)
