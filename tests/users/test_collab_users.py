"""Collab users in a store: the task's collab part (a bench run's trained MLP and item factors) is kept
beside the run's task adapter; each user's vector is folded in from their history's item keys, equal to
the bench's; a new user gets one without anyone else retraining; and a server serves them through the
trained MLP. A store without the part, or with one from another run, refuses with one line."""

from __future__ import annotations

import dataclasses
import json
import shutil

import httpx
import pytest
import torch

from tailorlm import models
from tailorlm.bench import runner
from tailorlm.bench.config import BenchConfig
from tailorlm.data import load_task
from tailorlm.data.schema import Example
from tailorlm.engine.engine import Engine
from tailorlm.kinds.collab import VECTOR, CollabSpec
from tailorlm.methods.collab import (
    ITEMS_FILE,
    PART_FILE,
    SHARED_FOLDER,
    CollabPart,
    ItemFactors,
    answers_of,
)
from tailorlm.methods.recipes import PromptBuilder, Recipe
from tailorlm.methods.setups import TaskAdapterSetup
from tailorlm.serve.config import ServeConfig
from tailorlm.serve.run import background, free_port
from tailorlm.serve.server import served_specs
from tailorlm.store.index import HistoryRecord
from tailorlm.store.store import ModuleStore
from tailorlm.users.errors import UserError
from tailorlm.users.service import UserService

# The smallest run that trains a task adapter and the collab MLP with the tiny model.
CONFIG = BenchConfig(model="tiny", test_users=3, adapter_users=4, adapter_examples=3, epochs=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A bench run of collab on bfi with the tiny model: its task adapter, collab part and test users."""
    out = tmp_path_factory.mktemp("run")
    runner.run("bfi", out, ["collab"], CONFIG)
    modules = out / "modules"
    return {
        "adapter": ModuleStore(modules / TaskAdapterSetup.store_name(Recipe())).folder(TaskAdapterSetup.USER),
        "part": modules / SHARED_FOLDER.format(tag="plain"),
        "vectors": ModuleStore(modules / "collab-plain"),
        "users": sorted(json.loads((out / "run.json").read_text())["identity"]["test_users"]),
    }


def collab_store(root, run, *, part=True, adapter=True) -> UserService:
    service = UserService(root)
    service.import_task("bfi", users=run["users"], kind="collab", seed=CONFIG.seed)
    service.configure(
        base_model=models.TINY_MODEL,
        task_adapter=run["adapter"] if adapter else None,
        collab=run["part"] if part else None,
    )
    return service


def test_the_part_a_run_keeps_holds_its_spec_mlp_and_items(run):
    part = CollabPart.load(run["part"])
    assert part.spec == CollabSpec() and part.task_adapter is not None
    task = load_task("bfi", seed=CONFIG.seed)
    assert len(part.items.factors) == 25  # bfi's statements, every one answered in training
    for user in run["users"]:  # the run's vectors are the part's items folded in
        stored = run["vectors"].get(user).tensors[VECTOR]
        folded = part.items.fold_in(answers_of(task, task.user(user)))
        torch.testing.assert_close(stored, folded.to(stored.dtype), atol=1e-3, rtol=0)


def test_users_are_folded_in_as_the_bench_folded_them_and_a_new_user_alone(tmp_path, run):
    service = collab_store(tmp_path / "store", run)
    assert service.train().trained == run["users"]
    for user in run["users"]:
        assert service.store.get(user).spec == CollabSpec()
        torch.testing.assert_close(
            service.store.get(user).tensors[VECTOR], run["vectors"].get(user).tensors[VECTOR], atol=0, rtol=0
        )
    # A new user's history names the items they answered: folded in alone, nobody else trains.
    task = load_task("bfi", seed=CONFIG.seed)
    donor = task.user(run["users"][0])
    history = [
        HistoryRecord(f"new-{n}", e.text, e.target, item_key=e.item_key)
        for n, e in enumerate(task.training_examples(donor))
    ]
    service.add("newcomer", "collab", history)
    assert service.history("newcomer")[0].item_key == history[0].item_key  # the index keeps item keys
    assert service.train().trained == ["newcomer"]
    part = CollabPart.load(run["part"])
    expected = part.items.fold_in([(r.item_key, float(task.labels.index(r.target))) for r in history])
    torch.testing.assert_close(service.store.get("newcomer").tensors[VECTOR], expected.half())
    # Without item keys (an older store's history) a user is the average user: vector 0.
    service.add("keyless", "collab", [HistoryRecord("k1", donor.train[0].text, donor.train[0].target)])
    service.train(["keyless"])
    assert service.store.get("keyless").tensors[VECTOR].abs().max() == 0
    service.close()


def test_a_store_refuses_collab_users_without_the_runs_part(tmp_path, run):
    bare = collab_store(tmp_path / "bare", run, part=False)
    with pytest.raises(UserError, match="keeps no collab part"):
        bare.train()
    with pytest.raises(UserError, match="keeps no collab part"):
        served_specs(bare, ("collab",))
    bare.close()
    # The MLP was trained over the run's task adapter: a store merging none refuses the part.
    unmerged = collab_store(tmp_path / "unmerged", run, adapter=False)
    with pytest.raises(UserError, match="trained over another task adapter than"):
        unmerged.train()
    unmerged.close()
    damaged = tmp_path / "damaged"
    shutil.copytree(run["part"], damaged)
    (damaged / ITEMS_FILE).write_bytes(b"not safetensors")
    service = UserService(tmp_path / "third")
    with pytest.raises(UserError, match="not a readable collab part"):
        service.configure(collab=damaged)
    (damaged / PART_FILE).unlink()
    with pytest.raises(UserError, match=r"collab\.json missing"):
        service.configure(collab=damaged)
    assert service.settings().collab is None
    service.close()
    # Once collab users have vectors, the part they were folded in against cannot be swapped.
    trained = collab_store(tmp_path / "trained", run)
    trained.train()
    with pytest.raises(UserError, match="folded in against another collab part"):
        trained.configure(collab=run["part"])
    trained.close()


def test_a_part_swapped_while_users_fold_in_leaves_them_stale_and_the_next_train_refolds(
    tmp_path, run, monkeypatch
):
    """The swap is refused once collab users have vectors, but a swap by another process while a
    ``train`` folds its first user in gets through: the vectors it stores were folded against the old
    items. They keep that items' fingerprint, so the users show stale and the next train refolds them."""
    part = CollabPart.load(run["part"])
    doubled = dataclasses.replace(part.items, factors={k: 2 * q for k, q in part.items.factors.items()})
    other = tmp_path / "other-part"
    dataclasses.replace(part, items=doubled).save(other)
    service = collab_store(tmp_path / "store", run)
    module = ItemFactors.module

    def swapped_meanwhile(items, task, user):
        if not swapped:
            elsewhere = UserService(tmp_path / "store")
            elsewhere.configure(collab=other)  # no collab user has a vector yet: allowed
            elsewhere.close()
            swapped.append(user.id)
        return module(items, task, user)

    swapped: list[str] = []
    monkeypatch.setattr(ItemFactors, "module", swapped_meanwhile)
    assert service.train().trained == run["users"] and swapped
    task = load_task("bfi", seed=CONFIG.seed)
    for user in run["users"]:
        assert (
            service.needs_training(user)
            == "folded in against other item factors than the store's collab part has"
        )
    assert service.train().trained == run["users"]
    for user in run["users"]:
        assert service.needs_training(user) is None
        folded = doubled.fold_in(answers_of(task, task.user(user)))
        stored = service.store.get(user).tensors[VECTOR]
        torch.testing.assert_close(stored, folded.to(stored.dtype), atol=1e-3, rtol=0)
    service.close()


def test_the_server_serves_collab_users_through_the_trained_mlp(tmp_path, run, tiny):
    service = collab_store(tmp_path / "store", run)
    service.train()
    user = run["users"][0]
    key = service.issue_key(user)
    labels = list(service.task().labels)
    item = "I am the life of the party."
    config = ServeConfig(store=str(service.root), port=free_port(), retrain=False, device="cpu")
    with background(config) as server:
        answer = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": user, "prompt": item, "labels": labels},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        posted = httpx.post(  # an answer to a known item, over HTTP: the item key is kept for fold-in
            f"{server.url}/v1/users/{user}/history",
            json={"items": [{"input": item, "target": labels[0], "item_key": "E1"}], "retrain": False},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        empty_key = httpx.post(
            f"{server.url}/v1/users/{user}/history",
            json={"items": [{"input": item, "target": labels[0], "item_key": ""}], "retrain": False},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
    assert answer.status_code == 200, answer.text
    assert posted.status_code == 202 and service.history(user)[-1].item_key == "E1", posted.text
    assert empty_key.status_code == 400 and empty_key.json()["error"]["param"], empty_key.text
    got = answer.json()["choices"][0]["label_scores"]
    # The bench's pathway: the base with the task adapter merged, the part's MLP, the user's vector.
    part = CollabPart.load(run["part"])
    prompt = PromptBuilder(service.task(), tiny.tokenizer, Recipe()).build(
        service.data_user(user), Example("request", item, "", ())
    )
    engine = Engine(service.load_base()(), part.spec, slots=2)
    engine.bank.write(1, service.store.get(user).tensors)
    untrained = engine.score_labels([prompt.text], [1], labels)[0]
    engine.bank.write_shared(part.shared)
    expected = engine.score_labels([prompt.text], [1], labels)[0]
    assert [got[label] for label in labels] == pytest.approx(expected, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(expected, untrained, strict=True)) > 1e-4  # the MLP matters
    service.close()


def test_the_cli_imports_collab_users_with_the_runs_part_and_trains_them(tmp_path, run):
    from typer.testing import CliRunner

    from tailorlm.cli import app

    store = tmp_path / "store"
    common = ["--store", str(store), "--json"]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    refused = CliRunner().invoke(
        app, ["users", "import", "bfi", "--kind", "collab", "--collab", str(damaged)]
    )
    assert refused.exit_code != 0 and "collab.json" in refused.output and not store.exists()
    imported = CliRunner().invoke(
        app,
        [
            "users", "import", "bfi", "--users", ",".join(run["users"]), "--seed", str(CONFIG.seed),
            "--kind", "collab", "--model", "tiny", "--task-adapter", str(run["adapter"]),
            "--collab", str(run["part"]), *common,
        ],
    )  # fmt: skip
    assert imported.exit_code == 0, imported.output
    trained = CliRunner().invoke(app, ["users", "train", *common])
    assert trained.exit_code == 0, trained.output
    service = UserService(store)
    for user in run["users"]:
        assert torch.equal(service.store.get(user).tensors[VECTOR], run["vectors"].get(user).tensors[VECTOR])
    service.close()


def test_a_server_refuses_a_part_that_does_not_fit_its_base_model(tmp_path, run, tiny):
    """A part whose MLP was made for another model (another hidden size): one line at start, no server."""
    service = collab_store(tmp_path / "store", run)
    service.train()
    part = CollabPart.load(service.root / ".collab")
    wrong = {
        name: torch.zeros(*tensor.shape[:-1], tensor.shape[-1] + 1) for name, tensor in part.shared.items()
    }
    dataclasses.replace(part, shared=wrong).save(service.root / ".collab")
    config = ServeConfig(store=str(service.root), port=free_port(), retrain=False, device="cpu")
    with pytest.raises(UserError, match="collab part does not fit base model"), background(config):
        pass
    service.close()
