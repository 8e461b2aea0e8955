"""The runner: resumes a killed run without redoing finished users, refuses to mix runs, scores right."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tailorlm.bench import runner
from tailorlm.bench.config import BenchConfig, split_users
from tailorlm.bench.run_folder import RunFolder, RunFolderError
from tailorlm.data import load_task
from tailorlm.methods.registry import resolve

CONFIG = BenchConfig(
    model="tiny", test_users=6, adapter_users=4, adapter_examples=16, epochs=1, users_per_step=2
)


class Killed(Exception):
    pass


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
