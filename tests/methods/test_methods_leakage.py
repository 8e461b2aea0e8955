"""The visibility rules, proven on the prompts real runs build (tiny model, small sample):

- a user's test items never reach anything trained, retrieved or profiled for them (only the question
  being asked shows its own item);
- the task adapter never sees a test user;
- no user's module sees another user's data.

Every prompt a setup builds reaches the run's trace with its provenance (``methods.recipes.Provenance``),
from the same call that produced the text the engine ran; this test reads those records and checks them
against rules stated here from the raw splits, not against ``Task.history_for`` or
``Task.training_examples``, so a mistake there shows up as a broken rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailorlm.bench import runner
from tailorlm.bench.config import BenchConfig
from tailorlm.data import load_task
from tailorlm.data.schema import Task
from tailorlm.methods.recipes import PromptUse
from tailorlm.methods.setups import TaskAdapterSetup
from tailorlm.store.store import ModuleStore

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"
SMALL = BenchConfig(
    model="tiny",
    test_users=3,
    adapter_users=4,
    adapter_examples=24,
    epochs=1,
    max_new_tokens=4,
    users_per_step=2,
    profile_items=4,
)
# Every family that puts the user's data somewhere: shots, retrieval (calibrated: with content-free
# twins), a profile, the task adapter trained with retrieval, per-user modules, OPPU with profiles.
VERBAGG_METHODS = ["few-shot", "rag-bm25@calibrated", "pag", "task-adapter+rag", "peft-lora", "oppu+pag"]
# LaMP-3 (time-based): each question carries the profile items it may see, so the rules bite on
# retrieval and profiles (alice's newest item is her first question's review).
LAMP_METHODS = ["rag-bm25", "pag", "peft-lora"]


class Run:
    """A finished run: its folder, its task as loaded, and every prompt use it traced."""

    def __init__(self, out: Path, task: Task, uses: list[PromptUse]) -> None:
        self.out = out
        self.task = task
        self.uses = uses
        record = json.loads((out / "run.json").read_text())
        self.test_ids = set(record["identity"]["test_users"])
        self.methods = list(record["methods"])

    def predictions(self, method: str) -> Iterator[tuple[str, str]]:
        for line in (self.out / "predictions" / f"{method}.jsonl").read_text().splitlines():
            record = json.loads(line)
            for example in record["examples"]:
                yield record["user"], example["id"]


@pytest.fixture(scope="module")
def verbagg_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("verbagg")
    uses: list[PromptUse] = []
    runner.run("verbagg", out, VERBAGG_METHODS, SMALL, trace=uses.append)
    return Run(out, load_task("verbagg", seed=SMALL.seed), uses)


@pytest.fixture(scope="module")
def lamp_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("lamp3")
    uses: list[PromptUse] = []
    data = FIXTURES / "lamp" / "lamp3_time"
    runner.run("lamp:3", out, LAMP_METHODS, SMALL.full(), data_dir=data, split="dev", trace=uses.append)
    return Run(out, load_task("lamp:3", data_dir=data, split="dev", seed=SMALL.seed), uses)


def check_prompts_show_only_what_the_asker_may_see(run: Run) -> None:
    """Shots, retrieved items and profile sources are the asking user's own data, never one of their
    validation or test items (nor the history item such an item was made from); a question that lists
    the items it may see (LaMP) shows no other; the asked example is never also shown."""
    task = run.task
    assert run.uses, "the run traced no prompts"
    for use in run.uses:
        p = use.prompt
        user = task.user(p.user)
        held_out = {e.id for e in [*user.val, *user.test]} | {
            e.source_id for e in [*user.val, *user.test] if e.source_id
        }
        own = {item.id for item in user.history} | {e.id for e in user.train}
        assert p.shown <= own, use
        assert not p.shown & held_out, use
        assert p.example not in {*p.shots, *p.retrieved}, use
        assert p.profile_of in (None, p.user), use
        example = next(e for e in user.examples() if e.id == p.example)
        if example.visible_ids is not None:
            assert set(p.retrieved) <= example.visible_ids, use
        for asked in user.test:
            # A profile serves every test question of its user: it may hold only what all of them may see.
            if asked.visible_ids is not None:
                assert set(p.profile_items) <= asked.visible_ids, use


def check_training_sees_only_its_own_users_data(run: Run) -> None:
    """The task adapter trains on users outside the test sample only; a user's module trains and
    validates on that user's own train and validation examples only."""
    splits = {u.id: ({e.id for e in u.train}, {e.id for e in u.val}) for u in run.task.users}
    for use in run.uses:
        if use.purpose == "answer":
            continue
        p = use.prompt
        train_ids, val_ids = splits[p.user]
        assert p.example in (train_ids if use.purpose == "train" else val_ids), use
        if use.module == TaskAdapterSetup.USER:
            assert p.user not in run.test_ids, use
        else:
            assert use.module == p.user, use
            assert p.user in run.test_ids, use


def check_the_trace_covers_the_run(run: Run) -> None:
    """Every module stored and every answer written has its prompts in the trace, so the checks above
    saw everything that was trained and asked."""
    trained = {(use.method, use.module) for use in run.uses if use.purpose == "train"}
    stored = {
        (folder.name, user)
        for folder in (run.out / "modules").glob("*")
        for user in ModuleStore(folder).users()
    }
    assert trained == stored
    asked = {(use.method, use.prompt.user, use.prompt.example) for use in run.uses if use.purpose == "answer"}
    for method in run.methods:
        name = method.split("@")[0]
        answered = {(name, user, example) for user, example in run.predictions(method)}
        assert answered, method
        assert answered <= asked, method
        assert {(m, u, e) for m, u, e in asked if m == name} == answered, method


def test_no_method_leaks_test_items_or_other_users(verbagg_run):
    run = verbagg_run
    check_prompts_show_only_what_the_asker_may_see(run)
    check_training_sees_only_its_own_users_data(run)
    check_the_trace_covers_the_run(run)
    purposes = {(use.method, use.purpose) for use in run.uses}
    # The run exercised every path: the adapters and the personal modules trained and validated.
    for store in ("task-adapter-bm25", "task-adapter-profile", "peft-lora", "oppu+pag"):
        assert {(store, "train"), (store, "validate")} <= purposes, store
    assert any(use.prompt.content_free for use in run.uses if use.method == "rag-bm25")
    assert any(use.prompt.profile_of for use in run.uses if use.method == "pag")
    assert any(use.prompt.retrieved for use in run.uses if use.method == "task-adapter-bm25")
    # Every test user got one prediction per test item from every method.
    for method in run.methods:
        by_user: dict[str, list[str]] = {}
        for user, example in run.predictions(method):
            by_user.setdefault(user, []).append(example)
        assert set(by_user) == run.test_ids
        for user, examples in by_user.items():
            assert examples == [e.id for e in run.task.user(user).test]


def test_questions_see_only_their_own_profile_items(lamp_run):
    run = lamp_run
    check_prompts_show_only_what_the_asker_may_see(run)
    check_training_sees_only_its_own_users_data(run)
    check_the_trace_covers_the_run(run)
    retrieved = {
        use.prompt.example: set(use.prompt.retrieved) for use in run.uses if use.method == "rag-bm25"
    }
    # alice's second question may see her newest review (a4); her first question is that review.
    assert "a4" in retrieved["3102"] and "a4" not in retrieved["3101"]
    profiles = {use.prompt.user: set(use.prompt.profile_items) for use in run.uses if use.method == "pag"}
    assert profiles["alice"] == {"a1", "a2", "a3"}
