"""PEFT-U folders: the fixture files in the exact PEFT-U format load; malformed ones name the problem."""

from __future__ import annotations

import json
import re

import pytest

from tailorlm.data import DataError, UnknownTaskError, load_task, render
from tailorlm.data.stats import summarize


def _hatexplain(fixtures):
    return load_task("peftu:hatexplain", data_dir=fixtures / "peftu" / "hatexplain")


def test_hatexplain_fixture_loads_with_the_file_splits(fixtures, no_leak):
    task = _hatexplain(fixtures)
    assert task.name == "peftu:hatexplain" and task.kind == "classification"
    assert task.labels == ("hatespeech", "normal", "offensive")
    assert task.metrics == ("lenient_accuracy", "accuracy", "f1")
    assert [u.id for u in task.users] == ["2", "7", "10"]  # numeric ids in number order
    user = task.user("2")
    assert [e.id for e in user.train] == ["2/p01", "2/p02", "2/p03", "2/p04"]
    assert [e.id for e in user.val] == ["2/p05"] and [e.id for e in user.test] == ["2/p06"]
    test = user.test[0]
    assert (test.text, test.target, test.targets, test.item_key) == (
        "that group should not be allowed to vote",
        "hatespeech",
        ("hatespeech",),
        "p06",
    )
    assert no_leak(task) > 0


def test_history_is_the_train_split_and_never_the_asked_item(fixtures):
    task = _hatexplain(fixtures)
    user = task.user("10")
    assert [h.id for h in user.history] == ["10/p01", "10/p05", "10/p06"]
    assert user.history[0].text == "the parade downtown was loud but fun Label: normal"
    assert [h.id for h in task.history_for(user, user.test[0])] == ["10/p01", "10/p05", "10/p06"]
    assert [h.id for h in task.history_for(user, user.train[1])] == ["10/p01", "10/p06"]
    assert task.training_examples(user) == user.train


def test_the_prompt_is_instruction_shots_query(fixtures):
    task = _hatexplain(fixtures)
    user = task.user("2")
    text = render.prompt(task, user.test[0], shots=user.train[:2])
    assert text.splitlines() == [
        task.spec.instruction,
        "Text: the parade downtown was loud but fun Label: normal",
        "Text: people like you ruin every thread Label: offensive",
        "Text: that group should not be allowed to vote Label:",
    ]
    assert render.query(task, user.test[0]) == "that group should not be allowed to vote"
    with pytest.raises(ValueError, match="is the example being asked"):
        render.prompt(task, user.train[0], shots=user.train[:1])


def test_disagreement_by_hand(fixtures):
    summary = summarize(_hatexplain(fixtures))
    # p01 normal x2 (0 differ); p02 offensive x2 + normal (1); p03 hatespeech x2 + offensive (1);
    # p04 normal x3 (0); p05 offensive x2 + normal (1); p06 hatespeech vs offensive, a tie that goes to the
    # label listed first, hatespeech (1): 4 of 16 answers differ.
    assert summary["disagreement"] == {"rate": 0.25, "answers": 16, "items": 6}
    assert summary["users"] == 3 and summary["examples"] == 16
    assert summary["examples_per_user"] == {"median": 6.0, "min": 4, "max": 6}
    # hatespeech: 2/p03, 2/p06, 7/p03; offensive: 2/p02, 2/p05, 10/p02, 10/p03, 10/p06, 7/p05; normal: rest
    assert summary["label_distribution"] == {"hatespeech": 3, "normal": 7, "offensive": 6}


def test_data_dir_may_be_the_parent_folder_or_the_file(fixtures):
    by_parent = load_task("peftu:hatexplain", data_dir=fixtures / "peftu")
    by_file = load_task(
        "peftu:hatexplain", data_dir=fixtures / "peftu" / "hatexplain" / "user_data_leaked.json"
    )
    assert [u.id for u in by_parent.users] == [u.id for u in by_file.users] == ["2", "7", "10"]


def test_multilabel_no_leak_file(fixtures, no_leak):
    task = load_task("peftu:goemotion", data_dir=fixtures / "peftu" / "goemotion")
    assert task.kind == "multilabel" and task.source.endswith("user_data_no_leak.json")
    first = task.user("u1").train[0]
    assert first.targets == ("anger", "surprise") and first.target == "anger, surprise"
    assert no_leak(task) > 0
    with pytest.raises(DataError, match=r"user_data_leaked\.json"):
        load_task("peftu:goemotion", data_dir=fixtures / "peftu" / "goemotion", split="leaked")


def test_unknown_names_and_missing_folder_are_errors(fixtures):
    with pytest.raises(UnknownTaskError, match="known tasks"):
        load_task("peftu:hatexplian", data_dir=fixtures)
    with pytest.raises(UnknownTaskError, match="--data"):
        load_task("peftu:hatexplain")
    with pytest.raises(UnknownTaskError, match="no split"):
        load_task("peftu:hatexplain", data_dir=fixtures / "peftu", split="dev")


def _write(tmp_path, payload, name="user_data_leaked.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def _good():
    return {
        "5": {
            "train": {"s1": {"text": "a", "label": ["normal"]}},
            "val": {"s2": {"text": "b", "label": ["offensive"]}},
            "test": {"s3": {"text": "c", "label": ["hatespeech"]}},
        }
    }


def _broken(kind):
    data = _good()
    sample = data["5"]["test"]["s3"]
    if kind == "missing text":
        del sample["text"]
    elif kind == "text not a string":
        sample["text"] = 7
    elif kind == "label not a list":
        sample["label"] = "normal"
    elif kind == "label outside the task":
        sample["label"] = ["rude"]
    elif kind == "two labels":
        sample["label"] = ["normal", "offensive"]
    elif kind == "missing split":
        del data["5"]["val"]
    elif kind == "empty user":
        data["6"] = {"train": {}, "val": {}, "test": {}}
    elif kind == "sample in two splits":
        data["5"]["train"]["s3"] = dict(sample)
    return data


@pytest.mark.parametrize(
    ("kind", "record", "field"),
    [
        ("missing text", "user 5 / test / s3", "'text'"),
        ("text not a string", "user 5 / test / s3", "'text'"),
        ("label not a list", "user 5 / test / s3", "'label'"),
        ("label outside the task", "user 5 / test / s3", "'label'"),
        ("two labels", "user 5 / test / s3", "'label'"),
        ("missing split", "user 5", "'val'"),
        ("empty user", "user 6", None),
        ("sample in two splits", "user 5 / test / s3", None),
    ],
)
def test_malformed_peftu_files_name_file_record_and_field(tmp_path, kind, record, field):
    path = _write(tmp_path, _broken(kind))
    with pytest.raises(DataError) as raised:
        load_task("peftu:hatexplain", data_dir=tmp_path)
    message = str(raised.value)
    assert str(path) in message and f"record {record}" in message, message
    if field:
        assert f"field {field}" in message, message


@pytest.mark.parametrize("payload", ["{not json", "[]", "{}"])
def test_unreadable_peftu_files(tmp_path, payload):
    path = _write(tmp_path, payload)
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_task("peftu:hatexplain", data_dir=tmp_path)


def test_tasks_without_fixed_label_strings_take_the_files_labels(tmp_path):
    data = _good()
    for split, label in zip(("train", "val", "test"), ("0", "1", "1"), strict=True):
        next(iter(data["5"][split].values()))["label"] = [label]
    _write(tmp_path, data)
    task = load_task("peftu:unhealthyconversations", data_dir=tmp_path)
    assert task.labels == ("0", "1")
