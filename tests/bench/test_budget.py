"""The work estimate and the budget: items counted per method (shared parts once), caps chosen loosest
first (training items per user, then test users), the same capped items for every method, and a run
that records its caps, prints its estimate and keeps its caps when resumed."""

from __future__ import annotations

import json
from dataclasses import replace

from tailorlm.bench import budget, runner
from tailorlm.bench.config import BenchConfig, split_users
from tailorlm.data import load_task
from tailorlm.methods.registry import resolve
from tailorlm.progress import Reporter

RATES = budget.Rates(train_s=0.1, score_s=0.05, generate_s=0.5, prompt_tokens=100.0, item_tokens=20.0)
CONFIG = BenchConfig(model="tiny", test_users=24, adapter_users=8, adapter_examples=64)


def _setup(names: list[str], config: BenchConfig = CONFIG):
    task = load_task("verbagg", seed=0)
    methods = [m for m, _ in resolve(task, names)]
    test, adapter = split_users(task, config)
    return task, methods, test, adapter


def test_the_estimate_counts_each_items_work_and_shared_parts_once():
    task, methods, test, adapter = _setup(["user-majority", "task-adapter", "oppu", "oppu-shrink"])
    rows = sum(len(task.training_examples(u)) for u in test)
    val = sum(len(u.val) for u in test)
    answers = sum(len(u.test) for u in test)
    adapter_rows = min(64, sum(len(task.training_examples(u)) for u in adapter))
    got = budget.estimate(methods, task, test, adapter, CONFIG, RATES).per_method
    assert got["user-majority"] == 0.0
    overhead = budget.METHOD_OVERHEAD_S
    assert abs(got["task-adapter"] - (adapter_rows * 0.1 + 2 * overhead + answers * 0.05)) < 1e-6
    personal = rows * CONFIG.epochs * 0.1 + val * CONFIG.epochs * 0.05
    # OPPU reuses the task adapter the task-adapter row trained: only its own modules and answers count.
    assert abs(got["oppu"] - (personal + overhead + answers * 0.05)) < 1e-6
    assert abs(got["oppu-shrink"] - got["oppu"]) < 1e-6  # its own store: the same work again


def test_a_run_over_budget_caps_training_items_first_then_test_users():
    task, methods, test, adapter = _setup(["peft-lora"])
    roomy = replace(CONFIG, budget_minutes=1000.0)
    assert budget.fit_budget(methods, task, test, adapter, roomy, RATES)[0] == roomy
    slower = replace(RATES, train_s=1.0)  # training dominates: a cap on items is enough
    smallest_cap = replace(CONFIG, user_examples=budget.USER_ITEM_CAPS[-1])
    fits = budget.estimate(methods, task, test, adapter, smallest_cap, slower).seconds
    tight = replace(CONFIG, budget_minutes=(fits + 1) / 60)
    capped, estimate = budget.fit_budget(methods, task, test, adapter, tight, slower)
    assert capped.user_examples is not None and capped.test_users == CONFIG.test_users
    assert estimate.seconds <= tight.budget_minutes * 60
    tiny_budget = replace(CONFIG, budget_minutes=0.01)
    capped, _ = budget.fit_budget(methods, task, test, adapter, tiny_budget, slower)
    assert capped.user_examples == budget.USER_ITEM_CAPS[-1] and capped.test_users == budget.MIN_TEST_USERS


def test_capped_users_keep_the_same_seeded_items_for_every_method():
    first = load_task("verbagg", seed=0)
    second = load_task("verbagg", seed=0)
    users_a, users_b = first.users[:5], second.users[:5]
    budget.cap_training_items(first, users_a, 7, seed=3)
    budget.cap_training_items(second, users_b, 7, seed=3)
    for a, b in zip(users_a, users_b, strict=True):
        assert len(a.train) == 7 and [e.id for e in a.train] == [e.id for e in b.train]
        assert [e.id for e in a.train] == sorted((e.id for e in a.train), key=[e.id for e in b.train].index)


class Lines(Reporter):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_a_capped_run_records_its_caps_and_keeps_them_when_resumed(tmp_path):
    config = replace(CONFIG, test_users=10, budget_minutes=0.001)
    said = Lines()
    runner.run("verbagg", tmp_path, ["user-majority", "peft-lora"], replace(config, epochs=1), reporter=said)
    assert any("estimated" in line for line in said.lines)
    assert any("over the 0.001-minute budget" in line for line in said.lines)
    recorded = json.loads((tmp_path / "run.json").read_text())["config"]
    assert recorded["user_examples"] == budget.USER_ITEM_CAPS[-1]
    assert recorded["test_users"] == budget.MIN_TEST_USERS
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["user_examples"] == budget.USER_ITEM_CAPS[-1]
    # Resumed with a roomy budget: the same users and caps, nothing run again.
    again = Lines()
    runner.run(
        "verbagg",
        tmp_path,
        ["user-majority", "peft-lora"],
        replace(config, epochs=1, budget_minutes=99),
        reporter=again,
    )
    assert (
        json.loads((tmp_path / "run.json").read_text())["config"]["user_examples"]
        == budget.USER_ITEM_CAPS[-1]
    )
    assert any("all 8 users done already" in line for line in again.lines)
