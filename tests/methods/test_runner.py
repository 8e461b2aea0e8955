"""The runner: resumes a killed run without redoing finished users, refuses to mix runs, scores right."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tailorlm.bench import budget, runner
from tailorlm.bench.config import BenchConfig, split_users
from tailorlm.bench.run_folder import RunFolder, RunFolderError
from tailorlm.cli import app
from tailorlm.data import load_task
from tailorlm.methods import baselines
from tailorlm.methods.registry import resolve
from tailorlm.progress import Reporter

CONFIG = BenchConfig(
    model="tiny", test_users=6, adapter_users=4, adapter_examples=16, epochs=1, users_per_step=2
)


class Killed(BaseException):
    """The process dying (a BaseException, like the KeyboardInterrupt of a ^C): not a method failing,
    which the runner records and goes past."""


def test_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    real_append = RunFolder.append
    calls: list[tuple[str, str]] = []
    resumed = False

    def append_then_die(self, key, user, predictions, seconds):
        real_append(self, key, user, predictions, seconds)
        calls.append((key, user.id))
        if len(calls) == 4 and not resumed:
            raise Killed

    monkeypatch.setattr(RunFolder, "append", append_then_die)
    with pytest.raises(Killed):
        runner.run("verbagg", tmp_path, ["user-majority", "zero-shot"], CONFIG)
    first_pass = list(calls)
    calls.clear()
    resumed = True
    runner.run("verbagg", tmp_path, ["user-majority", "zero-shot"], CONFIG)
    assert not set(calls) & set(first_pass)
    assert len(first_pass) + len(calls) == 2 * CONFIG.test_users
    for key in ("user-majority", "zero-shot"):
        assert len(RunFolder(tmp_path).done_users(key)) == CONFIG.test_users


def test_a_folder_of_another_run_is_refused(tmp_path):
    runner.run("verbagg", tmp_path, ["user-majority"], CONFIG)
    other = dataclasses.replace(CONFIG, seed=5)
    with pytest.raises(RunFolderError, match="holds another run"):
        runner.run("verbagg", tmp_path, ["user-majority"], other)


def test_unknown_method_and_bad_decoding_are_named(tmp_path):
    task = load_task("verbagg")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        resolve(task, ["nope"])
    with pytest.raises(ValueError, match="unknown decoding"):
        runner.run("verbagg", tmp_path, ["zero-shot@sideways"], CONFIG)


def test_user_majority_baseline_reads_only_training_labels(tmp_path):
    runner.run("verbagg", tmp_path, ["user-majority"], CONFIG)
    task = load_task("verbagg")
    test_users, _ = split_users(task, CONFIG)
    lines = {
        json.loads(x)["user"]: json.loads(x)
        for x in (tmp_path / "predictions" / "user-majority.jsonl").read_text().splitlines()
    }
    for user in test_users:
        train_labels = [e.target for e in task.training_examples(user)]
        top = max(train_labels.count(label) for label in set(train_labels))
        predicted = {e["prediction"] for e in lines[user.id]["examples"]}
        assert len(predicted) == 1 and train_labels.count(predicted.pop()) == top


def test_resumed_run_keeps_trained_modules_and_answers_only_the_rest(tmp_path, monkeypatch):
    real_append = RunFolder.append
    answered: list[str] = []

    def append_then_die(self, key, user, predictions, seconds):
        real_append(self, key, user, predictions, seconds)
        answered.append(user.id)
        if len(answered) == 2:
            raise Killed

    monkeypatch.setattr(RunFolder, "append", append_then_die)
    with pytest.raises(Killed):
        runner.run("verbagg", tmp_path, ["peft-lora"], CONFIG)
    monkeypatch.setattr(RunFolder, "append", real_append)
    uses = []
    runner.run("verbagg", tmp_path, ["peft-lora"], CONFIG, trace=uses.append)
    # Every module was trained before the kill: the second run trains nothing, asks only who is left.
    assert not [u for u in uses if u.purpose != "answer"]
    asked = {u.prompt.user for u in uses}
    assert len(asked) == CONFIG.test_users - 2 and not asked & set(answered)
    assert len(RunFolder(tmp_path).done_users("peft-lora")) == CONFIG.test_users


def test_a_method_that_fails_costs_no_other_method_its_results_and_resumes_later(tmp_path, monkeypatch):
    real = baselines.user_majority

    def crashes_after_one_user(task, users):
        answers = real(task, users)
        yield next(answers)
        raise RuntimeError("disk on fire\nsecond line of the message")

    monkeypatch.setattr(baselines, "user_majority", crashes_after_one_user)
    said: list[str] = []
    results = runner.run("verbagg", tmp_path, ["user-majority", "zero-shot"], CONFIG, reporter=Said(said))
    failed = results["methods"]["user-majority"]
    assert failed["failed"] == "RuntimeError: disk on fire" and failed["users_done"] == 1
    assert results["methods"]["zero-shot"]["failed"] is None and results["methods"]["zero-shot"]["complete"]
    assert (tmp_path / "report.html").is_file() and "user-majority (failed)" in (
        tmp_path / "report.md"
    ).read_text()
    recorded = json.loads((tmp_path / "failures.json").read_text())["user-majority"]
    assert "crashes_after_one_user" in recorded["traceback"]
    # scored as each method finished, in the log, before the next method ran
    assert said.index("user-majority: failed: RuntimeError: disk on fire") < next(
        i for i, text in enumerate(said) if text.startswith("zero-shot: accuracy ")
    )

    monkeypatch.setattr(baselines, "user_majority", real)
    again = runner.run("verbagg", tmp_path, ["user-majority", "zero-shot"], CONFIG)
    assert (
        again["methods"]["user-majority"]["failed"] is None and again["methods"]["user-majority"]["complete"]
    )
    assert json.loads((tmp_path / "failures.json").read_text()) == {}


class Said(Reporter):
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_bench_names_a_failed_method_and_exits_1_and_report_reads_the_folder(tmp_path, monkeypatch):
    def fails(task, users):
        raise ValueError("no answers today")
        yield  # a generator, as every baseline is

    monkeypatch.setattr(baselines, "user_majority", fails)
    # the work estimate times the model (tests/bench/test_budget.py); rule baselines need no rate
    monkeypatch.setattr(budget, "measure", lambda deps, plan, users: budget.Rates(load_s=0.01))
    args = ["bench", "--task", "verbagg", "--model", "tiny", "--test-users", "2", "--budget", "0"]
    bench = CliRunner().invoke(
        app, [*args, "--methods", "user-majority,item-majority", "--out", str(tmp_path)]
    )
    assert bench.exit_code == 1, bench.output
    assert "failed: user-majority: ValueError: no answers today" in bench.stderr
    assert "item-majority" in bench.stdout and "Traceback" not in bench.output
    report = CliRunner().invoke(app, ["report", str(tmp_path), "--json"])
    assert report.exit_code == 0, report.output
    payload = json.loads(report.stdout)
    assert payload["methods"]["user-majority"]["failed"] == "ValueError: no answers today"
    assert payload["methods"]["item-majority"]["has_results"]


def test_a_lamp_run_writes_the_outputs_of_the_methods_that_did_not_fail(tmp_path, monkeypatch):
    def fails_at_once(task, users):
        raise RuntimeError("no answers at all")
        yield  # a generator, as every baseline is

    monkeypatch.setattr(baselines, "user_majority", fails_at_once)
    data = Path(__file__).parents[1] / "data" / "fixtures" / "lamp" / "lamp3_time"
    results = runner.run("lamp:3", tmp_path, ["user-majority", "user-mean"], CONFIG.full(), data, "dev")
    assert results["methods"]["user-majority"]["failed"] == "RuntimeError: no answers at all"
    assert results["methods"]["user-majority"]["predictions_file"] is None
    assert results["methods"]["user-mean"]["complete"] and (tmp_path / "lamp" / "user-mean.json").is_file()
    assert not (tmp_path / "lamp" / "user-majority.json").exists() and (tmp_path / "report.md").is_file()


def test_a_line_cut_short_by_a_kill_is_dropped_before_the_next_user_is_appended(tmp_path):
    task = load_task("verbagg")
    first, second = task.users[:2]
    folder = RunFolder(tmp_path)
    folder.append("zero-shot", first, ["no"] * len(first.test), 1.0)
    with folder.predictions("zero-shot").open("a") as handle:
        handle.write('{"user": "' + second.id + '", "seco')  # the kill came mid-write
    assert folder.done_users("zero-shot") == {first.id}
    folder.append("zero-shot", second, ["yes"] * len(second.test), 1.0)
    lines = folder.predictions("zero-shot").read_text().splitlines()
    assert [json.loads(line)["user"] for line in lines] == [first.id, second.id]
