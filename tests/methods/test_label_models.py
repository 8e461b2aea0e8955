"""The shared-plus-personal label methods: the joint shared model, the methods offered for label tasks
only, and the visibility rules on the prompts a real run builds (tiny model). Each user's part is tested
in ``test_label_parts.py``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_methods_leakage import (
    SMALL,
    Run,
    check_prompts_show_only_what_the_asker_may_see,
    check_training_sees_only_its_own_users_data,
)

from tailorlm.bench import runner
from tailorlm.data import load_task
from tailorlm.kinds.label_bias import LabelBiasSpec
from tailorlm.methods import label_models, label_parts
from tailorlm.methods.recipes import PromptUse
from tailorlm.progress import Reporter
from tailorlm.store.store import ModuleStore

LABELS = ("yes", "perhaps", "no")


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
        assert meta["fit"] == "select" and meta["option"] in label_parts.OPTIONS
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
    assert {"task-adapter+bias", "fusion", "blend-stats"} <= set(default_methods(verbagg))
    fixture = Path(__file__).parents[1] / "data" / "fixtures" / "lamp" / "lamp7"
    tweets = load_task("lamp:7", data_dir=fixture, split="train")
    assert not label_parts.applies_to(tweets)
    assert not label_rows & set(methods_for(tweets))
    assert "fusion" not in default_methods(tweets) and "oppu" in default_methods(tweets)
    assert "blend-stats" not in default_methods(tweets)
