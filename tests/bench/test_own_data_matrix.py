"""A researcher's own file, from the file to a served answer, for every kind of task and every file format:
``data show``, a short ``bench`` with a rule method and a model method, ``report``, ``users import``, and a
request served for one imported user.

The files are made here, small (5 users x 12 items, the same rows in every format), and everything runs on
the tiny model. What is costly is shared per kind: one store holds a user imported from each format's
file, one ``users train`` trains them together, and one server answers the three.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import httpx
import pandas as pd
import pytest
from bench_helpers import flat_rates
from typer.testing import CliRunner

from tailorlm.bench import budget
from tailorlm.cli import app
from tailorlm.serve.config import ServeConfig
from tailorlm.serve.run import background, free_port

runner = CliRunner()

LIKERT = ["very inaccurate", "moderately inaccurate", "neither", "moderately accurate", "very accurate"]
EMOTIONS = ["anger", "fear", "joy"]
FORMATS = ("csv", "jsonl", "parquet")
USERS, ITEMS = 5, 12


def _target(case: str, user: int, item: int, rng: random.Random) -> object:
    if case == "classification":
        return rng.choice(["no", "yes"])
    if case == "rating-numbers":
        return rng.randint(1, 5)  # an int column in JSONL and Parquet, text in CSV: all read as "1".."5"
    if case == "rating-text":
        return LIKERT[min(4, max(0, user + rng.choice([-1, 0, 1])))]  # each user leans their own way
    if case == "multilabel":
        return ";".join(rng.sample(EMOTIONS, rng.randint(1, 2)))
    return f"a {rng.choice(['red', 'blue', 'green'])} title for item {item}"


# kind in the task file, labels it lists (None: read from the data), the rule method to bench, the labels
# a label request offers (None: a free-form request)
CASES: dict[str, tuple[str, list[str] | None, str]] = {
    "classification": ("classification", ["no", "yes"], "user-majority"),
    "rating-numbers": ("rating", None, "user-mean"),  # numbers order themselves
    "rating-text": ("rating", LIKERT, "user-mean"),
    "multilabel": ("multilabel", None, "user-majority"),
    "generation": ("generation", None, "nearest-output"),
}
EXPECTED_LABELS = {
    "classification": ["no", "yes"],
    "rating-numbers": ["1", "2", "3", "4", "5"],
    "rating-text": LIKERT,
    "multilabel": EMOTIONS,
    "generation": None,
}
PRIMARY = {"classification": "accuracy", "rating-numbers": "mae", "rating-text": "mae"}
PRIMARY |= {"multilabel": "lenient_accuracy", "generation": "rouge1"}


def write_files(folder: Path, case: str, fmt: str) -> tuple[Path, Path]:
    """The task file and the data file of ``case`` in format ``fmt``."""
    rng = random.Random(7)
    rows = [
        {
            "annotator": f"p{user}",
            "text": f"statement {item} about topic {item % 4}",
            "answer": _target(case, user, item, rng),
            "statement_id": f"s{item}",
        }
        for user in range(USERS)
        for item in range(ITEMS)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"answers.{fmt}"
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(data, index=False)
    elif fmt == "jsonl":
        frame.to_json(data, orient="records", lines=True)
    else:
        frame.to_parquet(data)
    kind, labels, _ = CASES[case]
    task = {
        "name": case.replace("-", "_"),
        "kind": kind,
        "instruction": "Answer as this person would.",
        "columns": {"user": "annotator", "input": "text", "target": "answer", "item": "statement_id"},
        **({"labels": labels} if labels is not None else {}),
    }
    task_file = folder / "task.json"
    task_file.write_text(json.dumps(task))
    return task_file, data


def cli(*args: str, code: int = 0) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


MATRIX = [pytest.param(case, fmt, id=f"{case}-{fmt}") for case in CASES for fmt in FORMATS]


@pytest.fixture(autouse=True)
def fixed_rates(monkeypatch):
    """``bench`` estimates its work from this machine's rates, measured by timing the model (tested in
    tests/bench/test_budget.py); here that would take most of each case's time, so fixed rates stand in."""
    monkeypatch.setattr(budget, "measure", lambda deps, plan, users: flat_rates(plan))


@pytest.mark.parametrize(("case", "fmt"), MATRIX)
def test_own_file_from_data_show_to_report_and_import(tmp_path, case, fmt):
    task_file, data = write_files(tmp_path / "files", case, fmt)
    name = f"table:{case.replace('-', '_')}"

    shown = cli("data", "show", str(task_file), "--data", str(data))
    assert shown["task"] == name and shown["users"] == USERS
    if case.startswith("rating"):  # how the scale was read is stated
        how = "scored as their position 1-5 in the task file's order" if case == "rating-text" else "numbers"
        assert how in shown["source"]
    labels = EXPECTED_LABELS[case]
    if labels is not None:
        assert list(shown["label_distribution"]) == labels  # in the scale's order for ratings

    run = tmp_path / "run"
    rule = CASES[case][2]
    bench = ["bench", "--task", str(task_file), "--data", str(data), "--model", "tiny", "--budget", "0"]
    # a rating's model method answers the median of its label distribution: the scale's order at work
    model = "zero-shot@median" if case.startswith("rating") else "zero-shot"
    results = cli(*bench, "--methods", f"{rule},{model}", "--test-users", "2", "--out", str(run))
    primary = PRIMARY[case]
    assert results["primary_metric"] == primary
    for method in (rule, model):
        summary = results["methods"][method]
        assert summary["failed"] is None and summary["complete"] and summary["n_users"] == 2
        value = summary["metrics"][primary]["user_mean"]
        assert 0 <= value <= (4 if primary == "mae" else 1)  # a 1-5 scale errs by at most 4 steps
    if labels is not None and case != "multilabel":
        for method in (rule, model):
            lines = (run / "predictions" / f"{method}.jsonl").read_text().splitlines()
            assert {e["prediction"] for line in lines for e in json.loads(line)["examples"]} <= set(labels)

    reported = cli("report", str(run))
    assert reported["methods"] == results["methods"] and (run / "report.html").is_file()
    assert primary in (run / "report.md").read_text()

    store = tmp_path / "store"
    imported = cli(
        "users", "import", str(task_file), "--data", str(data), "--limit", "2", "--store", str(store)
    )
    assert imported["task"] == name and imported["users"] == ["p0", "p1"] and imported["items_added"] > 0
    listed = cli("users", "list", "--store", str(store))
    assert [u["user"] for u in listed["users"]] == ["p0", "p1"] and listed["settings"]["labels"] == labels


# A store imported from your own task file keeps the task's whole spec (ServiceSettings.task_spec), so its
# users train and their label requests are asked in the task's prompt without the file.
SERVED_USER = {fmt: f"p{i}" for i, fmt in enumerate(FORMATS)}  # each format's file gives one user


class Served:
    """One kind's store, a user imported from each format's file and trained, and a server over it."""

    def __init__(self, folder: Path, case: str) -> None:
        store = folder / "store"
        self.imported = {}
        for fmt, user in SERVED_USER.items():
            task_file, data = write_files(folder / fmt, case, fmt)
            args = [
                "users",
                "import",
                str(task_file),
                "--data",
                str(data),
                "--users",
                user,
                "--store",
                str(store),
            ]
            self.imported[fmt] = cli(*args, "--model", "tiny")
        train = runner.invoke(app, ["users", "train", "--epochs", "1", "--store", str(store), "--json"])
        assert train.exit_code == 0, train.output
        trained = json.loads(train.stdout)
        assert sorted(trained["trained"]) == sorted(SERVED_USER.values()), trained
        self.keys = {
            u: cli("users", "key", "issue", u, "--store", str(store))["key"] for u in trained["trained"]
        }
        config = ServeConfig(store=store, port=free_port(), retrain=False, slots=4, max_context=512)
        self._server = background(config)
        self.url = self._server.__enter__().url

    def close(self) -> None:
        self._server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``served(case)``: that kind's ``Served``, built on first use; the previous kind's server is stopped
    then (the matrix runs kind after kind)."""
    current: dict[str, Served] = {}

    def get(case: str) -> Served:
        if case not in current:
            for previous in current.values():
                previous.close()
            current.clear()
            current[case] = Served(tmp_path_factory.mktemp(case), case)
        return current[case]

    yield get
    for left in current.values():
        left.close()


@pytest.mark.parametrize(("case", "fmt"), MATRIX)
def test_own_file_user_trained_and_served(served, case, fmt):
    kind = served(case)
    user = SERVED_USER[fmt]
    assert kind.imported[fmt]["users"] == [user] and kind.imported[fmt]["items_added"] > 0
    labels = EXPECTED_LABELS[case]
    body: dict = {"model": user, "prompt": "statement 3 about topic 3", "max_tokens": 4}
    if labels is not None:
        body["labels"] = labels  # asked as the benchmark asks: the store's task prompt for this item
    answer = httpx.post(
        f"{kind.url}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {kind.keys[user]}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    if labels is not None:
        assert choice["text"] in labels and set(choice["label_scores"]) == set(labels)
    else:
        assert isinstance(choice["text"], str) and answer.json()["usage"]["completion_tokens"] >= 1


def test_a_store_keeps_its_task_without_the_task_file(tmp_path):
    """The store keeps a task file's whole spec: moving or deleting the file (and the table) afterwards
    leaves the store's users trainable and their prompts the task's."""
    task_file, data = write_files(tmp_path / "files", "rating-text", "csv")
    store = str(tmp_path / "store")
    cli(
        "users",
        "import",
        str(task_file),
        "--data",
        str(data),
        "--users",
        "p0",
        "--store",
        store,
        "--model",
        "tiny",
    )
    shutil.rmtree(tmp_path / "files")
    trained = runner.invoke(app, ["users", "train", "--epochs", "1", "--store", store, "--json"])
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["trained"] == ["p0"]
