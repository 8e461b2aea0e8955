"""The shared-plus-personal label methods: the fusion and its tuning, a per-user selection made on the user's
own validation items, the joint shared model, and the visibility rules on the prompts a real run builds
(tiny model). The bias fit itself is tested in ``tests/train/test_joint.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_methods_leakage import (
    SMALL,
    Run,
    check_prompts_show_only_what_the_asker_may_see,
    check_training_sees_only_its_own_users_data,
)

from tailorlm.bench import runner
from tailorlm.data import load_task
from tailorlm.data.schema import Example, Task, User
from tailorlm.data.specs import TaskSpec
from tailorlm.kinds.label_bias import LabelBiasSpec
from tailorlm.methods import label_models
from tailorlm.methods.recipes import PromptUse
from tailorlm.progress import Reporter
from tailorlm.store.store import ModuleStore

LABELS = ("yes", "perhaps", "no")


def test_fusion_weight_zero_is_the_prior_and_one_the_shared_model():
    shared = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), -1)
    prior = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    torch.testing.assert_close(label_models.fuse(shared, prior, 0.0), prior, atol=1e-6, rtol=0)
    torch.testing.assert_close(label_models.fuse(shared, prior, 1.0), shared, atol=1e-6, rtol=0)
    half = label_models.fuse(shared, prior, 0.5).exp()
    expected = (shared.exp() * prior.exp()).sqrt()
    torch.testing.assert_close(half, expected / expected.sum(), atol=1e-6, rtol=0)


def _example(user: str, item: str, target: str) -> Example:
    return Example(f"{user}/{item}", f"item {item}", target, (target,), item_key=item)


@pytest.fixture
def three_users() -> Task:
    spec = TaskSpec("toy", "offline", "toy", "classification", LABELS, ("accuracy",), "label-model tests")
    users = [
        User(u, train=[_example(u, "t", "yes")], val=[_example(u, f"v{i}", t) for i, t in enumerate(vals)])
        for u, vals in (("ann", ["yes", "yes"]), ("bob", ["no", "no"]), ("cid", ["perhaps", "perhaps"]))
    ]
    return Task("toy", "classification", LABELS, ("accuracy",), users, spec)


def _always(label: str):
    def source(queries, purpose):
        row = torch.log(torch.tensor([0.8 if x == label else 0.1 for x in LABELS]))
        return row.expand(len(queries), -1)

    return source


def test_tuning_keeps_the_best_setting_and_ties_go_to_the_safest(three_users):
    golds = ["yes", "no", "no"]
    chosen, values = label_models.best_setting(
        three_users, (0.0, 0.5, 1.0), golds, lambda w: ["yes", "no", "no"] if w == 0.5 else ["no"] * 3
    )
    assert chosen == 0.5 and values[0.5] == 1.0 and math.isclose(values[0.0], 2 / 3)
    tie, _ = label_models.best_setting(three_users, (0.0, 0.5, 1.0), golds, lambda w: ["no"] * 3)
    assert tie == 0.0


def _choose(task: Task, sources) -> dict[str, str]:
    val = label_models.queries_of(task.users, "val", task)
    predictions = {o: label_models.decide(task, source(val, "validate")) for o, source in sources.items()}
    return label_models.select_per_user(task, task.users, val, predictions)


def test_each_user_gets_the_option_best_on_their_own_validation_items(three_users):
    sources = {"prior": _always("perhaps"), "bias": _always("no"), "module": _always("yes")}  # simplest first
    assert _choose(three_users, sources) == {"ann": "module", "bob": "bias", "cid": "prior"}
    # cid's items now split between the module's answer and the bias's: a tie on cid's own items goes to
    # the option best over every user's items, and between equals (here 3 of 6 each) to the simpler.
    cid = three_users.user("cid")
    cid.val[:] = [_example("cid", "v0", "yes"), _example("cid", "v1", "no")]
    assert _choose(three_users, sources) == {"ann": "module", "bob": "bias", "cid": "bias"}


def test_label_parts_as_scale_and_bias_give_the_prior_the_fusion_and_the_bias(three_users):
    """``UserParts.apply`` is the label-bias kind's arithmetic: scale 0 and the log prior answer the prior,
    scale w and (1 - w) log prior answer ``fuse``, scale 1 and b answer the shared distribution plus b,
    renormalised."""
    shared = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]), -1)
    queries = [(three_users.user("ann"), None), (three_users.user("bob"), None)]
    log_prior = {
        "ann": torch.log(torch.tensor([0.2, 0.3, 0.5])),
        "bob": torch.log(torch.tensor([0.6, 0.3, 0.1])),
    }
    prior = torch.stack([log_prior["ann"], log_prior["bob"]])
    as_prior = label_models.UserParts({u: (p, 0.0) for u, p in log_prior.items()}, {}).apply(shared, queries)
    torch.testing.assert_close(as_prior, prior, atol=1e-6, rtol=0)
    fused = label_models.UserParts(label_models._fused(log_prior, 0.3), {}).apply(shared, queries)
    torch.testing.assert_close(fused, label_models.fuse(shared, prior, 0.3), atol=1e-6, rtol=0)
    bias = torch.tensor([0.5, -0.5, 0.0])
    biased = label_models.UserParts({"ann": (bias, 1.0), "bob": (bias, 1.0)}, {}).apply(shared, queries)
    torch.testing.assert_close(biased, torch.log_softmax(shared + bias, dim=-1), atol=1e-6, rtol=0)


class Heard(Reporter):
    """The last (done, total) each progress label reported."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, int]] = {}

    def progress(self, label: str):
        return lambda done, total: self.last.__setitem__(label, (done, total))


def test_label_methods_keep_to_the_visibility_rules(tmp_path):
    """A real run of the three methods (tiny model): every prompt they fit, tune or answer with shows
    only what its user may see; each user's bias and module is fitted on that user's data only; the
    stored biases are label-bias modules over the task's labels, one per test user."""
    uses: list[PromptUse] = []
    methods = ["task-adapter+bias", "task-adapter+select", "fusion", "oppu-select"]
    progress = Heard()
    runner.run("verbagg", tmp_path, methods, SMALL, trace=uses.append, reporter=progress)
    # Fitting the biases reports its progress, user by user, to the end.
    assert progress.last["task-adapter+bias: scoring training items"] == (SMALL.test_users, SMALL.test_users)
    run = Run(tmp_path, load_task("verbagg", seed=SMALL.seed), uses)
    check_prompts_show_only_what_the_asker_may_see(run)
    check_training_sees_only_its_own_users_data(run)
    biases = ModuleStore(tmp_path / "modules" / "task-adapter+bias-plain")
    assert set(biases.users()) == run.test_ids
    for user in run.test_ids:
        assert biases.get(user).spec == LabelBiasSpec(tuple(run.task.labels))
        fitted_on = {u.prompt.example for u in uses if u.purpose == "train" and u.module == user}
        own = {e.id for e in run.task.training_examples(run.task.user(user))}
        assert fitted_on and fitted_on <= own
    chosen = ModuleStore(tmp_path / "modules" / "task-adapter+select-plain")
    assert set(chosen.users()) == run.test_ids
    for user in run.test_ids:
        meta = chosen.get(user).meta
        assert meta["fit"] == "select" and meta["option"] in label_models.OPTIONS
    tuned = {(u.method, u.prompt.user) for u in uses if u.purpose == "validate"}
    assert {("fusion", user) for user in run.test_ids} <= tuned
    for method in methods:
        record = [
            json.loads(x) for x in (tmp_path / "predictions" / f"{method}.jsonl").read_text().splitlines()
        ]
        assert {r["user"] for r in record} == run.test_ids


def test_the_joint_shared_model_trains_on_other_users_and_each_user_fits_only_their_bias(tmp_path):
    """joint+bias on a real run (tiny model): the shared model trains and validates on the adapter users'
    labelled items only, is stored as a LoRA with its objective and shrinkage, and every test user's
    stored bias was fitted on that user's own training items against it."""
    uses: list[PromptUse] = []
    runner.run("verbagg", tmp_path, ["joint+bias"], SMALL, trace=uses.append)
    run = Run(tmp_path, load_task("verbagg", seed=SMALL.seed), uses)
    check_prompts_show_only_what_the_asker_may_see(run)
    check_training_sees_only_its_own_users_data(run)
    shared = ModuleStore(tmp_path / "modules" / "joint-shared-plain").get("task")
    assert shared.spec.kind == "lora"
    assert shared.meta["shrinkage"] == label_models.JOINT_SHRINKAGE and shared.meta["bias_users"] > 1
    trained_on = {(u.prompt.user, u.purpose) for u in uses if u.method == "joint-shared-plain"}
    assert {purpose for _, purpose in trained_on} == {"train", "validate"}
    assert not {user for user, _ in trained_on} & run.test_ids
    biases = ModuleStore(tmp_path / "modules" / "joint+bias-plain")
    assert set(biases.users()) == run.test_ids
    for user in run.test_ids:
        fitted_on = {u.prompt.example for u in uses if u.purpose == "train" and u.module == user}
        assert fitted_on and fitted_on <= {e.id for e in run.task.training_examples(run.task.user(user))}
    # The shared model differs from the plain task adapter's (another objective), so the biases are
    # fitted against another model: the two stores' biases differ.
    runner.run("verbagg", tmp_path, ["task-adapter+bias"], SMALL)
    plain = ModuleStore(tmp_path / "modules" / "task-adapter+bias-plain")
    user = sorted(run.test_ids)[0]
    assert not torch.equal(plain.get(user).tensors["label_bias"], biases.get(user).tensors["label_bias"])


def test_label_methods_are_offered_for_label_tasks_only(tmp_path):
    from tailorlm.methods.registry import default_methods, methods_for

    verbagg = load_task("verbagg", seed=0)
    label_rows = {"task-adapter+bias", "task-adapter+select", "joint+bias", "fusion", "oppu-select"}
    assert label_rows <= set(methods_for(verbagg))
    assert {"task-adapter+bias", "fusion"} <= set(default_methods(verbagg))
    fixture = Path(__file__).parents[1] / "data" / "fixtures" / "lamp" / "lamp7"
    tweets = load_task("lamp:7", data_dir=fixture, split="train")
    assert not label_models.applies_to(tweets)
    assert not label_rows & set(methods_for(tweets))
    assert "fusion" not in default_methods(tweets) and "oppu" in default_methods(tweets)
