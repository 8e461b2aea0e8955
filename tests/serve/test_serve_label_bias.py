"""Users whose personal part is a label bias: imported with ``kind="label-bias"`` (the labels come from
the store's task), fitted instead of trained, versioned like any module, served from a slot: a label
request's scores are the shared model's plus that user's bias."""

from __future__ import annotations

import httpx
import pytest
import torch
from serve_helpers import fresh, serve_config

from tailorlm import models
from tailorlm.data.schema import Example
from tailorlm.engine.engine import Engine
from tailorlm.kinds.label_bias import BIAS, WEIGHT, LabelBiasSpec
from tailorlm.methods.baselines import LabelPrior
from tailorlm.methods.label_parts import SHRINKAGE_KEY, WEIGHT_KEY
from tailorlm.methods.recipes import PromptBuilder, Recipe
from tailorlm.serve.run import background
from tailorlm.store.index import HistoryRecord
from tailorlm.users.errors import UserError
from tailorlm.users.service import UserService

USERS = ["1", "2", "3"]


@pytest.fixture
def biased(tmp_path, tiny):
    service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", base_model=models.TINY_MODEL)
    service.import_task("verbagg", users=USERS, kind="label-bias")
    outcome = service.train()
    assert sorted(outcome.trained) == USERS
    yield service
    service.close()


def test_a_label_bias_user_is_fitted_and_versioned(biased):
    labels = tuple(biased.task().labels)
    shrinkage = biased.store.index.meta(SHRINKAGE_KEY)
    for user in USERS:
        stored = biased.store.get(user)
        assert stored.spec == LabelBiasSpec(labels)
        assert stored.tensors[BIAS].shape == (len(labels),)
        assert repr(stored.meta["shrinkage"]) == shrinkage
    assert biased.train().trained == []  # up to date: nothing is fitted again
    # New history: only that user is fitted again, a new version, with the store's shrinkage.
    biased.add_history("2", [HistoryRecord("new-item", "I would curse at a late bus.", "yes")])
    again = biased.train()
    assert again.trained == ["2"] and len(biased.store.versions("2")) == 2
    assert repr(biased.store.get("2").meta["shrinkage"]) == shrinkage


def test_a_task_without_labels_cannot_have_a_label_bias(tmp_path, tiny):
    service = UserService(tmp_path / "gen", load_base=lambda: fresh(tiny))
    service.configure(task="lamp:7", base_model=models.TINY_MODEL)
    for attempt in (
        lambda: service.configure(kind="label-bias"),
        lambda: service.add("ann", "label-bias", [HistoryRecord("i1", "text", "a tweet")]),
    ):
        with pytest.raises(UserError, match="label-bias module needs a task with a label set"):
            attempt()
    assert service.list_users() == []  # nothing half-added
    service.close()


def test_the_server_adds_the_users_bias_to_the_shared_models_label_scores(biased, tiny):
    key = biased.issue_key("2")
    labels = list(biased.task().labels)
    item = "I would shout at the driver."
    with background(serve_config(biased.root, retrain=False), base=fresh(tiny)) as server:
        headers = {"Authorization": f"Bearer {key}"}
        labelled = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "2", "prompt": item, "labels": labels},
            headers=headers,
            timeout=60,
        )
        text = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "2", "prompt": item, "max_tokens": 6, "temperature": 0},
            headers=headers,
            timeout=60,
        )
    assert labelled.status_code == 200 and text.status_code == 200, (labelled.text, text.text)
    builder = PromptBuilder(biased.task(), tiny.tokenizer, Recipe())
    prompt = builder.build(biased.data_user("2"), Example("request", item, "", ())).text
    engine = Engine(fresh(tiny), LabelBiasSpec(tuple(labels)), slots=2)
    shared = torch.tensor(engine.score_labels([prompt], [0], labels)[0])
    bias = biased.store.get("2").tensors[BIAS]
    got = labelled.json()["choices"][0]["label_scores"]
    assert [got[label] for label in labels] == pytest.approx((shared + bias).tolist(), abs=1e-4)
    assert (
        text.json()["choices"][0]["text"]
        == engine.generate([item], [0])[0][: len(text.json()["choices"][0]["text"])]
    )


def test_users_fitted_by_select_are_served_their_prior_their_bias_or_their_fusion(tmp_path, tiny):
    """A store whose label users are fitted as ``select``: each user's stored part is the option their own
    validation items chose, its weight says which (the prior alone is weight 0), and the server answers
    ``weight * shared + bias`` for every user in one run."""
    users = [str(i) for i in range(1, 7)]
    service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", base_model=models.TINY_MODEL, label_fit="select")
    service.import_task("verbagg", users=users, kind="label-bias")
    assert sorted(service.train().trained) == users
    weight = float(service.store.index.meta(WEIGHT_KEY))
    labels = list(service.task().labels)
    item = "I would shout at the driver."
    keys = {user: service.issue_key(user) for user in users}
    with background(serve_config(service.root, retrain=False), base=fresh(tiny)) as server:
        answers = {
            user: httpx.post(
                f"{server.url}/v1/completions",
                json={"model": user, "prompt": item, "labels": labels},
                headers={"Authorization": f"Bearer {keys[user]}"},
                timeout=60,
            )
            for user in users
        }
    builder = PromptBuilder(service.task(), tiny.tokenizer, Recipe())
    engine = Engine(fresh(tiny), LabelBiasSpec(tuple(labels)), slots=2)
    options = set()
    for user in users:
        stored = service.store.get(user)
        option, weight_of = stored.meta["option"], float(stored.tensors[WEIGHT])
        options.add(option)
        assert stored.meta["fit"] == "select"
        assert weight_of == pytest.approx({"prior": 0.0, "bias": 1.0, "fusion": weight}[option], abs=1e-3)
        prompt = builder.build(service.data_user(user), Example("request", item, "", ())).text
        shared = torch.tensor(engine.score_labels([prompt], [0], labels)[0])
        expected = weight_of * shared + stored.tensors[BIAS]
        got = answers[user].json()["choices"][0]["label_scores"]
        assert [got[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-4)
    assert options <= {"prior", "bias", "fusion"} and options
    service.close()


def test_an_unknown_label_fit_is_refused(tmp_path, tiny):
    service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny))
    with pytest.raises(UserError, match="label fit 'median' is not one of bias, fusion, select"):
        service.configure(label_fit="median")
    service.close()


def test_a_fused_users_prior_is_smoothed_toward_the_whole_store(tmp_path, tiny):
    """``--label-fit fusion``: each user's part is weight ``w`` and bias ``(1 - w)`` times the log of their
    label prior, smoothed toward every user's labels in the store (as the benchmark smooths it), not toward
    uniform: fitting one user must not forget the others."""
    users = [str(i) for i in range(1, 6)]
    service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", base_model=models.TINY_MODEL, label_fit="fusion")
    service.import_task("verbagg", users=users, kind="label-bias")
    assert service.train(["2"]).trained == ["2"]  # one user alone: the prior still sees all five
    weight = float(service.store.index.meta(WEIGHT_KEY))
    population = service.task([service.data_user(u) for u in users])
    alone = service.task([service.data_user("2")])
    stored = service.store.get("2")
    expected = (1 - weight) * torch.log(torch.tensor(LabelPrior(population).user(population.user("2"))))
    lonely = (1 - weight) * torch.log(torch.tensor(LabelPrior(alone).user(alone.user("2"))))
    assert float(stored.tensors[WEIGHT]) == pytest.approx(weight, abs=1e-3)
    assert stored.meta["option"] == "fusion"
    torch.testing.assert_close(stored.tensors[BIAS].float(), expected, atol=2e-3, rtol=0)
    if weight < 1:
        assert not torch.allclose(expected, lonely, atol=1e-2)
    service.close()
