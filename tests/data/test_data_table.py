"""Your own per-user table (CSV, JSONL, Parquet) described by a task file: the users, splits and labels it
gives, and an error naming the file, row and column for every malformed input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from tailorlm.data import DataError, UnknownTaskError, load_task

COLUMNS = {"user": "annotator", "input": "text", "target": "label", "item": "mid"}


def rows(users: int = 12, items: int = 15, seed: int = 0, **extra) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "annotator": f"a{u}",
            "text": f"message {i} about topic {i % 4}",
            "label": rng.choice(["no", "yes"]),
            "mid": f"m{i}",
            **{k: v(u, i) for k, v in extra.items()},
        }
        for u in range(users)
        for i in range(items)
    ]


def write(folder: Path, table: list[dict], suffix: str = ".csv", **task) -> tuple[str, Path]:
    path = folder / f"data{suffix}"
    frame = pd.DataFrame(table)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    task_file = folder / "task.json"
    spec = {
        "name": "tone",
        "kind": "classification",
        "instruction": "Is it rude?",
        "columns": COLUMNS,
        **task,
    }
    task_file.write_text(json.dumps(spec))
    return str(task_file), path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_table_becomes_users_split_per_user_by_label(tmp_path, suffix):
    task_file, data = write(tmp_path, rows(), suffix)
    task = load_task(task_file, data_dir=data, seed=3)
    assert task.name == "table:tone" and task.labels == ("no", "yes") and task.metrics[0] == "accuracy"
    assert [u.id for u in task.users] == [f"a{u}" for u in range(12)]  # natural order: a2 before a10
    assert all((len(u.train), len(u.val), len(u.test)) == (11, 2, 2) for u in task.users)  # 80/10/10 of 15
    assert "stratified by label, seed 3" in task.source and not task.chronological
    first = task.users[0]
    assert {e.item_key for e in first.train + first.val + first.test} == {f"m{i}" for i in range(15)}
    again = load_task(task_file, data_dir=data, seed=3)
    assert [e.id for e in again.users[0].test] == [e.id for e in first.test]  # seeded


def test_a_time_column_splits_chronologically(tmp_path):
    table = rows(time=lambda u, i: f"2024-02-{i + 1:02d}")
    task_file, data = write(tmp_path, table, columns={**COLUMNS, "time": "time"})
    task = load_task(task_file, data_dir=data)
    user = task.users[0]
    assert task.chronological and "chronological by column 'time'" in task.source
    assert max(e.time for e in user.train) < min(e.time for e in user.val) <= min(e.time for e in user.test)
    assert [e.item_key for e in user.test] == ["m13", "m14"]  # the latest items


def test_a_split_column_is_obeyed(tmp_path):
    table = rows(fold=lambda u, i: "test" if i == 0 else ("validation" if i == 1 else "train"))
    task_file, data = write(tmp_path, table, columns={**COLUMNS, "split": "fold"})
    task = load_task(task_file, data_dir=data)
    assert all(
        [e.item_key for e in u.test] == ["m0"] and [e.item_key for e in u.val] == ["m1"] for u in task.users
    )
    assert "splits from column 'fold'" in task.source


def test_ratings_keep_the_given_label_order(tmp_path):
    table = rows()
    for i, row in enumerate(table):
        row["label"] = str(1 + i % 5)
    task_file, data = write(tmp_path, table, kind="rating", labels=["1", "2", "3", "4", "5"])
    task = load_task(task_file, data_dir=data)
    assert task.labels == ("1", "2", "3", "4", "5") and task.ordinal and task.metrics[0] == "mae"


LIKERT = ["very inaccurate", "moderately inaccurate", "neither", "moderately accurate", "very accurate"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_likert_scale_keeps_the_listed_order_and_says_how_it_is_scored(tmp_path, suffix):
    table = rows()
    for i, row in enumerate(table):
        row["label"] = LIKERT[i % 5]
    task_file, data = write(tmp_path, table, suffix, kind="rating", labels=LIKERT)
    task = load_task(task_file, data_dir=data)
    assert task.labels == tuple(LIKERT) and task.ordinal and task.metrics[0] == "mae"
    assert "rating labels scored as their position 1-5 in the task file's order" in task.source


def test_numeric_ratings_without_labels_are_ordered_by_number(tmp_path):
    table = rows()
    for i, row in enumerate(table):
        row["label"] = str([1, 2, 10][i % 3])  # as text, "10" would sort before "2"
    task_file, data = write(tmp_path, table, ".jsonl", kind="rating")
    task = load_task(task_file, data_dir=data)
    assert task.labels == ("1", "2", "10") and "scored as the numbers they are" in task.source


def test_a_rating_order_that_cannot_be_trusted_is_refused_before_anything_runs(tmp_path):
    table = rows()
    for i, row in enumerate(table):
        row["label"] = LIKERT[i % 5]
    task_file, data = write(tmp_path, table, kind="rating")  # text labels, no order given
    with pytest.raises(DataError, match=r'"moderately accurate", .*list them in the task file in their'):
        load_task(task_file, data_dir=data)
    task_file, data = write(tmp_path, rows(), kind="rating", labels=["1", "3", "2"])
    with pytest.raises(DataError, match=r"numbers out of order: list them as \['1', '2', '3'\]"):
        load_task(task_file, data_dir=data)


def test_multilabel_targets_are_split(tmp_path):
    table = rows()
    for i, row in enumerate(table):
        row["label"] = "joy; anger" if i % 3 == 0 else "joy"
    task_file, data = write(tmp_path, table, kind="multilabel")
    task = load_task(task_file, data_dir=data)
    assert task.labels == ("anger", "joy")
    assert {e.targets for u in task.users for e in u.train} == {("joy", "anger"), ("joy",)}


def broken(table: list[dict], row: int, column: str, value) -> list[dict]:
    table[row - 1][column] = value
    return table


@pytest.mark.parametrize(
    "table, task, message",
    [
        (broken(rows(), 7, "label", ""), {}, "row 7, field 'label': is empty"),
        (broken(rows(), 3, "annotator", ""), {}, "row 3, field 'annotator': is empty"),
        (
            broken(rows(), 5, "label", "maybe"),
            {"labels": ["no", "yes"]},
            "row 5, field 'label': 'maybe' is not",
        ),
        (broken(rows(), 2, "mid", "m0"), {}, "row 2, field 'mid': user 'a0' has item 'm0' twice"),
        (rows(), {"columns": {**COLUMNS, "input": "body"}}, "field 'body': no such column"),
        (rows(), {"columns": {**COLUMNS, "time": "when"}}, "field 'when': no such column"),
        (rows(), {"kind": "opinion"}, "field 'kind': must be one of"),
        (rows(), {"kind": "rating"}, "field 'labels': a rating task's labels are scored by their order"),
        (rows(), {"labels": ["no", "yes", "no"]}, "field 'labels': 'no' is listed twice"),
        (rows(), {"instruction": ""}, "field 'instruction'"),
        (rows(), {"columns": {"person": "annotator"}}, "unknown roles ['person']"),
        (rows(users=2, items=5), {}, "no user has the 10 rows"),
    ],
)
def test_every_malformed_input_names_file_row_and_column(tmp_path, table, task, message):
    task_file, data = write(tmp_path, table, **task)
    with pytest.raises(DataError) as error:
        load_task(task_file, data_dir=data)
    assert message in str(error.value)
    assert "data.csv" in str(error.value) or "task.json" in str(error.value)


def test_bad_times_and_splits_name_their_row(tmp_path):
    table = broken(rows(time=lambda u, i: "2024-01-01"), 4, "time", "yesterday-ish")
    task_file, data = write(tmp_path, table, columns={**COLUMNS, "time": "time"})
    with pytest.raises(
        DataError, match="row 4, field 'time': 'yesterday-ish' is neither a number nor a date"
    ):
        load_task(task_file, data_dir=data)
    table = broken(rows(fold=lambda u, i: "train"), 9, "fold", "holdout")
    task_file, data = write(tmp_path, table, columns={**COLUMNS, "split": "fold"})
    with pytest.raises(DataError, match="row 9, field 'fold': 'holdout' is not one of"):
        load_task(task_file, data_dir=data)


def test_files_that_are_not_tables(tmp_path):
    task_file, data = write(tmp_path, rows())
    (tmp_path / "bad.jsonl").write_text('{"annotator": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: cannot be read as JSONL"):
        load_task(task_file, data_dir=tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_task(task_file, data_dir=tmp_path / "missing.csv")
    with pytest.raises(UnknownTaskError, match="give it as --data"):
        load_task(task_file)
    with pytest.raises(DataError, match=r"no user_data_leaked\.json or user_data_no_leak\.json here"):
        load_task(task_file, data_dir=tmp_path)  # a folder is read as PEFT-U's format, and has none
    (tmp_path / "task2.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="must be a JSON object"):
        load_task(str(tmp_path / "task2.json"), data_dir=data)


def test_a_peftu_format_file_loads_under_a_task_file(tmp_path):
    folder = Path(__file__).parent / "fixtures" / "peftu" / "hatexplain"
    task_file = tmp_path / "mine.json"
    task_file.write_text(json.dumps({"name": "my-hate", "kind": "classification", "instruction": "Hateful?"}))
    task = load_task(str(task_file), data_dir=folder)
    reference = load_task("peftu:hatexplain", data_dir=folder)
    assert task.name == "table:my-hate" and task.spec.instruction == "Hateful?"
    assert [u.id for u in task.users] == [u.id for u in reference.users]
    assert [e.target for u in task.users for e in u.test] == [
        e.target for u in reference.users for e in u.test
    ]


def test_a_peftu_format_file_rated_in_words_needs_its_order_too(tmp_path):
    folder = Path(__file__).parent / "fixtures" / "peftu" / "hatexplain"
    task_file = tmp_path / "mine.json"
    task_file.write_text(json.dumps({"name": "severity", "kind": "rating", "instruction": "How bad?"}))
    with pytest.raises(DataError, match=r'user_data_leaked\.json.*"hatespeech", "normal", "offensive"'):
        load_task(str(task_file), data_dir=folder)  # alphabetical is no scale
    order = ["normal", "offensive", "hatespeech"]
    task_file.write_text(
        json.dumps({"name": "severity", "kind": "rating", "instruction": "How bad?", "labels": order})
    )
    task = load_task(str(task_file), data_dir=folder)
    assert task.labels == tuple(order) and "position 1-3 in the task file's order" in task.source


def test_a_table_with_item_ids_can_hold_items_out(tmp_path):
    task_file, data = write(tmp_path, rows())
    task = load_task(task_file, data_dir=data, split="items", seed=2)
    assert "items held out for every user: 3 test, 2 validation of 15, seed 2" in task.source
    assert all((len(u.train), len(u.val), len(u.test)) == (10, 2, 3) for u in task.users)
    held = {e.item_key for u in task.users for e in u.test + u.val}
    assert not held & {e.item_key for u in task.users for e in u.train}
    without_items = tmp_path / "plain"
    without_items.mkdir()
    task_file, data = write(
        without_items, rows(), columns={"user": "annotator", "input": "text", "target": "label"}
    )
    with pytest.raises(DataError, match="examples without an item id, so items cannot be held out"):
        load_task(task_file, data_dir=data, split="items")


@pytest.mark.parametrize(
    "encoding, separator",
    [("utf-8-sig", ","), ("utf-16", ","), ("utf-8", ";"), ("utf-8", "\t"), ("utf-16", ";"), ("utf-8", "|")],
)
def test_a_spreadsheets_csv_reads_as_the_plain_one(tmp_path, encoding, separator):
    """A byte-order mark, UTF-16 with one, and a semicolon, tab or bar for the comma (as spreadsheets
    save): the same users and items as the plain UTF-8 file."""
    task_file, plain = write(tmp_path, rows(), ".csv")
    other = tmp_path / "other.csv"
    pd.read_csv(plain, dtype=str).to_csv(other, index=False, sep=separator, encoding=encoding)
    assert other.read_bytes() != plain.read_bytes()
    expected, found = load_task(task_file, data_dir=plain), load_task(task_file, data_dir=other)
    assert [(u.id, [(e.text, e.target, e.item_key) for e in u.examples()]) for u in found.users] == [
        (u.id, [(e.text, e.target, e.item_key) for e in u.examples()]) for u in expected.users
    ]


def test_a_csv_in_another_encoding_is_one_error_naming_the_fix(tmp_path):
    table = rows()
    table[3]["text"] = "un message déplacé"
    task_file, _ = write(tmp_path, table, ".csv")
    latin = tmp_path / "latin.csv"
    pd.DataFrame(table).to_csv(latin, index=False, encoding="latin-1")
    with pytest.raises(DataError, match=r"is not UTF-8 text .*save it as UTF-8"):
        load_task(task_file, data_dir=latin)


def test_one_label_in_the_data_or_the_task_file_is_refused(tmp_path):
    """Every answer the same label: every method would score 1.0 and nothing could be measured."""
    table = rows()
    for row in table:
        row["label"] = "yes"
    task_file, data = write(tmp_path, table, ".csv")
    with pytest.raises(DataError, match="every answer in column 'label' is 'yes'"):
        load_task(task_file, data_dir=data)
    task_file, data = write(tmp_path, rows(), ".csv", labels=["yes"])
    with pytest.raises(DataError, match="lists one label"):
        load_task(task_file, data_dir=data)
    task_file, data = write(tmp_path, table, ".csv", labels=["no", "yes"])  # listed: the data may lack some
    assert load_task(task_file, data_dir=data).labels == ("no", "yes")
