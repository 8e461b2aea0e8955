"""The work estimate and the budget: the work counted per method (shared parts once) from rates timed
through the methods' own calls, caps chosen loosest first (test users, then training items per user,
then the task adapter's examples), the same capped items for every method, and a run that records its
caps and its estimate against what each method took, says in a row when items were cut, and keeps its
caps when resumed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from bench_helpers import flat_rates

from tailorlm.bench import budget, runner
from tailorlm.bench.config import BenchConfig, split_users
from tailorlm.bench.report.markdown import render_markdown
from tailorlm.bench.report.tables import timing_rows, users_cell
from tailorlm.data import load_task
from tailorlm.engine.engine import Engine
from tailorlm.methods.decoding import default_decoding
from tailorlm.methods.deps import MethodDeps, base_loader
from tailorlm.methods.recipes import Recipe
from tailorlm.methods.registry import resolve
from tailorlm.progress import Reporter
from tailorlm.train.trainer import TrainConfig, planned_passes

PLAIN = Recipe()
RATES = budget.Rates(
    load_s=2.0,
    answer_s={budget.answer_key(PLAIN, "likelihood", bare): 0.05 for bare in (True, False)},
    label_s={"plain:answer": 0.07, "plain:fit": 0.03},
    train_s={"personal:plain": 0.1, "adapter:plain": 0.2},
    validate_s={"plain": 0.04},
    measure_s=5.0,
)
CONFIG = BenchConfig(model="tiny", test_users=24, adapter_users=8, adapter_examples=64)


def _plan(task, names: list[str]) -> list[budget.PlanEntry]:
    return [
        (m.name, m, "rule" if m.setup is None else default_decoding(task)) for m, _ in resolve(task, names)
    ]


def _setup(names: list[str], config: BenchConfig = CONFIG):
    task = load_task("verbagg", seed=0)
    test, adapter = split_users(task, config)
    return task, _plan(task, names), test, adapter


def test_the_estimate_counts_each_parts_work_and_shared_parts_once():
    task, plan, test, adapter = _setup(["user-majority", "zero-shot", "task-adapter", "oppu", "oppu-shrink"])
    rows = sum(len(task.training_examples(u)) for u in test)
    val = sum(len(u.val) for u in test)
    answers = sum(len(u.test) for u in test)
    adapter_rows = min(64, sum(len(task.training_examples(u)) for u in adapter))
    adapter_val = min(64, sum(len(u.val) for u in adapter))
    got = budget.estimate(plan, task, test, adapter, CONFIG, RATES)
    assert got.per_method["user-majority"] == 0.0
    assert got.per_method["zero-shot"] == pytest.approx(2.0 + answers * 0.05)
    trained = 2.0 + adapter_rows * 0.2 + adapter_val * 0.04
    assert got.per_method["task-adapter"] == pytest.approx(trained + 2.0 + answers * 0.05)
    personal = CONFIG.epochs * (rows * 0.1 + val * 0.04)
    # OPPU reuses the task adapter the task-adapter row trained: only its own modules and answers count.
    assert got.per_method["oppu"] == pytest.approx(personal + 2.0 + answers * 0.05)
    assert got.per_method["oppu-shrink"] == pytest.approx(got.per_method["oppu"])  # its own store
    assert got.seconds == pytest.approx(5.0 + sum(got.per_method.values()))  # measuring is run time


def test_personal_training_counts_every_pass_of_the_trainers_schedule():
    """A personal module's training is the trainer's passes (``planned_passes``), each a fixed cost plus
    its rows: a user with many more rows than the rest trains alone at the end, in passes of one batch,
    which a rate per row alone undercounts."""
    task, plan, test, adapter = _setup(["peft-lora"])
    settings = CONFIG.method_settings()
    with_passes = replace(RATES, pass_s={"personal:plain": 1.0})
    added = (
        budget.estimate(plan, task, test, adapter, CONFIG, with_passes).per_method["peft-lora"]
        - budget.estimate(plan, task, test, adapter, CONFIG, RATES).per_method["peft-lora"]
    )
    schedule = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size)
    rows = [len(task.training_examples(u)) for u in test]
    assert added == pytest.approx(len(planned_passes(schedule, settings.users_per_step, rows)))
    # The same 168 rows: twelve users of 14, or one of 124 and eleven of 4 (tate's shape).
    even = planned_passes(schedule, 8, [14] * 12)
    skewed = planned_passes(schedule, 8, [124] + [4] * 11)
    assert sum(even) == sum(skewed) == 2 * 168 and len(skewed) > 2 * len(even)


def test_measuring_times_a_pass_of_one_users_batch_and_a_full_one(monkeypatch):
    """The line through a pass of one user's batch (4 rows) and a full pass (16 rows, four users)."""
    task = load_task("verbagg", seed=0)
    seen: list[int] = []
    token_nll = Engine.token_nll

    def spy(self, batch):
        if torch.is_grad_enabled():  # training passes, not the validation loss
            seen.append(int(batch.input_ids.shape[0]))
        return token_nll(self, batch)

    monkeypatch.setattr(Engine, "token_nll", spy)
    rates = _rates(task, ["peft-lora"], replace(CONFIG, test_users=8))
    key = budget.train_key("personal", PLAIN)
    assert rates.pass_s[key] >= 0 and rates.train_s[key] > 0
    assert {4, 16} <= set(seen), seen


def test_label_models_count_scoring_each_users_training_items():
    task, plan, test, adapter = _setup(["task-adapter+bias", "fusion"])
    fit = sum(len(task.training_examples(u)) for u in test)
    val = sum(len(u.val) for u in test)
    answers = sum(len(u.test) for u in test)
    got = budget.estimate(plan, task, test, adapter, CONFIG, RATES).per_method
    adapter_work = 2.0 + min(64, sum(len(task.training_examples(u)) for u in adapter)) * 0.2
    adapter_work += min(64, sum(len(u.val) for u in adapter)) * 0.04
    biases = fit * 0.03 + val * 0.07
    assert got["task-adapter+bias"] == pytest.approx(adapter_work + biases + 2.0 + answers * 0.07)
    assert got["fusion"] == pytest.approx(2.0 + (val + answers) * 0.07)


def test_the_blends_and_collab_count_the_model_they_score_with():
    """``blend`` trains the task adapter and scores validation rows and answers with it; ``collab`` adds
    the shared MLP's epochs (at the adapter's per-row rate) and its validation passes; ``blend-collab``
    reuses what ``collab`` trained; ``blend-stats`` scores nothing."""
    task = load_task("bfi", seed=0)
    test, adapter = split_users(task, CONFIG)
    plan = _plan(task, ["blend-stats", "blend", "collab", "blend-collab"])
    got = budget.estimate(plan, task, test, adapter, CONFIG, RATES).per_method
    val = sum(len(u.val) for u in test)
    answers = sum(len(u.test) for u in test)
    adapter_val = min(64, sum(len(u.val) for u in adapter))
    adapter_rows = min(64, sum(len(task.training_examples(u)) for u in adapter))
    adapter_work = 2.0 + adapter_rows * 0.2 + adapter_val * 0.04
    scored = 2.0 + (val + adapter_val + answers) * 0.07
    assert got["blend-stats"] == 0.0
    assert got["blend"] == pytest.approx(adapter_work + scored)
    mlp = 2.0 + 2 * adapter_rows * 0.2 + 3 * adapter_val * 0.07
    assert got["collab"] == pytest.approx(mlp + answers * 0.07)  # the adapter was counted by blend
    assert got["blend-collab"] == pytest.approx(scored)


def test_a_run_over_budget_cuts_test_users_before_any_training_item():
    task, plan, _, _ = _setup(["peft-lora"])
    roomy = replace(CONFIG, budget_minutes=1000.0)
    assert budget.fit_budget(plan, task, roomy, RATES)[0] == roomy
    # A budget that 12 users fit: the users are cut, each user keeps every training item.
    twelve = replace(CONFIG, test_users=12)
    fits = budget.fit_budget(plan, task, replace(twelve, budget_minutes=None), RATES)[1].seconds
    capped, estimate = budget.fit_budget(plan, task, replace(CONFIG, budget_minutes=fits / 60), RATES)
    assert capped.user_examples is None and budget.MIN_TEST_USERS < capped.test_users < CONFIG.test_users
    assert estimate.seconds <= fits
    # Tighter: the users go down to the floor first, and only then are items cut.
    slower = replace(RATES, train_s={"personal:plain": 1.0})
    capped, estimate = budget.fit_budget(plan, task, replace(CONFIG, budget_minutes=3.0), slower)
    assert capped.test_users == budget.MIN_TEST_USERS and capped.user_examples is not None
    assert estimate.seconds <= 180
    looser = [c for c in budget.USER_ITEM_CAPS if c > capped.user_examples]
    for cap in looser:  # every looser cap was over the budget
        over = replace(capped, user_examples=cap)
        test, adapter = split_users(task, over)
        assert budget.estimate(plan, task, test, adapter, over, slower).seconds > 180
    assert budget.cuts(CONFIG, capped) == {
        "test_users": [24, budget.MIN_TEST_USERS],
        "user_examples": [None, capped.user_examples],
    }


def test_the_task_adapters_examples_are_cut_last():
    task, plan, _, _ = _setup(["task-adapter", "peft-lora"])
    slow_adapter = replace(RATES, train_s={"personal:plain": 0.001, "adapter:plain": 5.0})
    config = replace(CONFIG, adapter_examples=256, adapter_users=None, budget_minutes=6.0)
    capped, _ = budget.fit_budget(plan, task, config, slow_adapter)
    assert capped.test_users == budget.MIN_TEST_USERS
    assert capped.user_examples == budget.USER_ITEM_CAPS[-1]  # every users' cut came first
    assert capped.adapter_examples in budget.ADAPTER_EXAMPLE_CAPS


def test_fully_capped_and_still_over_it_leaves_out_the_costliest_method_of_a_family_it_keeps():
    names = ["zero-shot", "few-shot", "rag-bm25", "peft-lora", "peft-ia3", "peft-prompt", "oppu"]
    task, plan, _, _ = _setup(names)
    flat = flat_rates(plan, 0.05)
    slow = replace(flat, train_s={**flat.train_s, "personal:plain": 1.0})
    tightest = replace(
        CONFIG,
        test_users=budget.MIN_TEST_USERS,
        user_examples=budget.USER_ITEM_CAPS[-1],
        adapter_examples=budget.ADAPTER_EXAMPLE_CAPS[-1],
    )
    test, adapter = split_users(task, tightest)
    whole = budget.estimate(plan, task, test, adapter, tightest, slow)
    # Room for all but about one and a half per-user module's training: two must go.
    module = whole.per_method["peft-ia3"]
    capped, got = budget.fit_budget(
        plan, task, replace(CONFIG, budget_minutes=(whole.seconds - 1.5 * module) / 60), slow
    )
    assert capped.user_examples == budget.USER_ITEM_CAPS[-1] and len(capped.left_out) == 2
    # Never a family's first; of equal costs, the latest in the plan first.
    assert capped.left_out == ("peft-prompt", "peft-ia3")
    assert set(got.per_method) == set(names) - set(capped.left_out)
    assert got.seconds <= whole.seconds - 1.5 * module
    one_less = replace(capped, left_out=capped.left_out[:1])
    assert budget.estimate(budget.kept(plan, one_less), task, test, adapter, one_less, slow).seconds > (
        whole.seconds - 1.5 * module
    )
    # A plan of one method per family has nothing to leave out: the tightest caps, said to be over.
    lone = [entry for entry in plan if entry[0] in ("zero-shot", "few-shot", "peft-lora", "oppu")]
    capped, got = budget.fit_budget(lone, task, replace(CONFIG, budget_minutes=0.01), slow)
    assert capped.left_out == () and got.seconds > 0.6


def test_capped_users_keep_the_same_seeded_items_for_every_method():
    first = load_task("verbagg", seed=0)
    second = load_task("verbagg", seed=0)
    users_a, users_b = first.users[:5], second.users[:5]
    before = {u.id: len(u.train) for u in users_a}
    cut = budget.cap_training_items(first, users_a, 7, seed=3)
    budget.cap_training_items(second, users_b, 7, seed=3)
    assert cut == {uid: n for uid, n in before.items() if n > 7}
    for a, b in zip(users_a, users_b, strict=True):
        assert len(a.train) == 7 and [e.id for e in a.train] == [e.id for e in b.train]
        assert [e.id for e in a.train] == sorted((e.id for e in a.train), key=[e.id for e in b.train].index)


# ---- measuring through the methods' own calls (tiny model) ----------------------------------------------


def _rates(task, names: list[str], config: BenchConfig) -> budget.Rates:
    test, adapter = split_users(task, config)
    deps = MethodDeps(task, base_loader("tiny"), "unused", config.method_settings(), adapter_users=adapter)
    return budget.measure(deps, _plan(task, names), test)


def test_measuring_generates_as_the_methods_do_with_the_runs_token_limit(monkeypatch):
    """Generation is timed through ``decoding.answer``: the run's token limit and its stop at the end of
    the answer's line, on the method's own prompts, so the rate follows what the run will generate."""
    task = load_task("tate", seed=0)
    seen: list[tuple[int, tuple[str, ...], int]] = []
    generate = Engine.generate

    def spy(self, prompts, slots, config, **kwargs):
        seen.append((config.max_new_tokens, tuple(config.stop), len(prompts)))
        return generate(self, prompts, slots, config, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    config = replace(CONFIG, test_users=8, max_new_tokens=7)
    rates = _rates(task, ["zero-shot"], config)
    assert rates.answer_s[budget.answer_key(PLAIN, "generate", bare=True)] > 0
    assert (7, ("\n",), budget.PILOT_GENERATIONS) in seen


def test_measuring_scores_every_label_of_the_task(monkeypatch):
    """Label scoring is timed with the task's own labels: a label set twelve times larger (each label
    longer too) measures slower."""
    task = load_task("verbagg", seed=0)
    seen: list[int] = []
    score = Engine.score_labels

    def spy(self, prompts, slots, labels, **kwargs):
        seen.append(len(labels))
        return score(self, prompts, slots, labels, **kwargs)

    monkeypatch.setattr(Engine, "score_labels", spy)
    config = replace(CONFIG, test_users=8)
    key = budget.answer_key(PLAIN, "likelihood", bare=True)
    few = _rates(task, ["zero-shot"], config).answer_s[key]
    many_labels = [f"answer number {i} of a long list of possible answers" for i in range(36)]
    monkeypatch.setattr(task, "labels", many_labels)
    many = _rates(task, ["zero-shot"], config).answer_s[key]
    assert len(task.labels) in seen and 3 in seen
    assert many > 2 * few, (few, many)


# ---- a run --------------------------------------------------------------------------------------------


class Lines(Reporter):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_a_capped_run_records_caps_and_times_says_so_in_rows_and_keeps_them_when_resumed(tmp_path):
    config = replace(CONFIG, test_users=10, budget_minutes=0.001, epochs=1)
    names = ["user-majority", "zero-shot", "peft-lora", "peft-ia3"]
    said = Lines()
    runner.run("verbagg", tmp_path, names, config, reporter=said)
    assert any("estimated" in line for line in said.lines)
    assert any("over the 0.001-minute budget" in line for line in said.lines)
    assert any(line.startswith("time: peft-lora: estimated") for line in said.lines)
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert recorded["config"]["test_users"] == budget.MIN_TEST_USERS  # users first ...
    assert recorded["config"]["user_examples"] == budget.USER_ITEM_CAPS[-1]  # ... then items
    assert recorded["config"]["left_out"] == ["peft-ia3"]  # ... then a method with a sibling kept
    assert any("left out peft-ia3" in line for line in said.lines)
    cut = [u for u, e in recorded["users"].items() if "train_before_cap" in e]
    assert cut and all(recorded["users"][u]["train"] == budget.USER_ITEM_CAPS[-1] for u in cut)
    results = json.loads((tmp_path / "results.json").read_text())
    lora = results["methods"]["peft-lora"]
    # estimate and actual side by side, for the run and per method
    assert lora["estimated_seconds"] > 0 and lora["actual_seconds"] > 0
    assert lora["estimate_ratio"] == pytest.approx(lora["estimated_seconds"] / lora["actual_seconds"])
    assert results["timing"]["estimated_seconds"] > results["timing"]["measure_seconds"] > 0
    assert results["timing"]["run_seconds"] > 0
    # the rows of methods that read the users' own items say they were cut; zero-shot's does not
    note = f"training items cut to {budget.USER_ITEM_CAPS[-1]} per user ({len(cut)} of 8 users"
    assert lora["cuts"] and lora["cuts"][0].startswith(note)
    assert results["methods"]["user-majority"]["cuts"] == lora["cuts"]
    assert results["methods"]["zero-shot"]["cuts"] == []
    assert note in users_cell(lora) and note not in users_cell(results["methods"]["zero-shot"])
    assert "peft-ia3" not in results["methods"] and results["timing"]["budget_cuts"]["left_out"] == [
        [],
        ["peft-ia3"],
    ]
    markdown = render_markdown(results, {})
    assert "## Time: estimate against actual" in markdown and note in markdown
    assert "left out peft-ia3 (fully capped" in markdown
    page = (tmp_path / "report.html").read_text()
    assert "Time: estimate against actual" in page and note in page
    assert [row[0] for row in timing_rows(results)[1]] == ["zero-shot", "peft-lora", "whole run"]
    # Resumed with a roomy budget: the same users and caps, nothing run again.
    again = Lines()
    runner.run("verbagg", tmp_path, names, replace(config, budget_minutes=99), reporter=again)
    recorded = json.loads((tmp_path / "run.json").read_text())["config"]
    assert recorded["user_examples"] == budget.USER_ITEM_CAPS[-1] and recorded["left_out"] == ["peft-ia3"]
    assert "peft-ia3" not in json.loads((tmp_path / "results.json").read_text())["methods"]
    assert any("all 8 users done already" in line for line in again.lines)
