"""The data commands: `data list`, `data show`, `score`; --json gives one object, mistakes one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tailorlm.cli import app

runner = CliRunner()


def _json(args):
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_data_list_names_every_task():
    payload = _json(["data", "list"])
    names = [t["name"] for t in payload["tasks"]]
    assert "verbagg" in names and "peftu:hatexplain" in names and "lamp:7" in names
    assert len(names) == 25
    human = runner.invoke(app, ["data", "list"])
    assert human.exit_code == 0 and "peftu:studemo" in human.output


@pytest.mark.parametrize(
    ("task", "users", "examples"),
    [("verbagg", 316, 7584), ("movielens", 943, 100_000), ("bfi", 2800, None), ("tate", 116, 2886)],
)
def test_data_show_offline_figures(task, users, examples):
    payload = _json(["data", "show", task])
    assert payload["users"] == users
    if examples is not None:
        assert payload["examples"] == examples
    if task == "verbagg":
        assert payload["examples_per_user"] == {"median": 24.0, "min": 24, "max": 24}
        assert 0.44 < payload["disagreement"]["rate"] < 0.46


def test_data_show_human_view(fixtures):
    result = runner.invoke(app, ["data", "show", "peftu:hatexplain", "--data", str(fixtures / "peftu")])
    assert result.exit_code == 0, result.output
    assert "users: 3" in result.output and "disagreement: 25.0%" in result.output


def test_data_show_lamp_with_split(fixtures):
    payload = _json(
        ["data", "show", "lamp:3", "--data", str(fixtures / "lamp" / "lamp3_time"), "--split", "dev"]
    )
    assert payload["users"] == 2 and payload["splits"] == {"train": 5, "val": 0, "test": 3}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["data", "show", "nosuchtask"], "unknown task"),
        (["data", "show", "peftu:hatexplain"], "--data"),
        (["data", "show", "verbagg", "--data", "/tmp"], "installed package"),
        (["data", "show", "lamp:2", "--data", "/nonexistent/folder"], "dev_questions.json"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(args, needle):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert result.output.strip().startswith("error:")


def test_score_json_and_human(fixtures, tmp_path):
    golds = fixtures / "lamp" / "lamp2" / "dev_outputs.json"
    preds = tmp_path / "preds.json"
    outputs = [{"id": "2001", "output": " sci-fi "}, {"id": "2002", "output": "comedy"}]
    preds.write_text(json.dumps({"task": "LaMP_2", "golds": outputs}))
    payload = _json(["score", "--golds", str(golds), "--preds", str(preds)])
    assert payload["task"] == "LaMP_2" and payload["pooled"]["accuracy"] == 0.5
    assert "per_user" not in payload and set(payload["ci95"]) == {"accuracy", "f1"}
    human = runner.invoke(app, ["score", "--golds", str(golds), "--preds", str(preds)])
    assert human.exit_code == 0 and "accuracy" in human.output


def test_score_names_the_mismatched_file(fixtures, tmp_path):
    golds = fixtures / "lamp" / "lamp2" / "dev_outputs.json"
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"task": "LaMP_2", "golds": [{"id": "2001", "output": "sci-fi"}]}))
    result = runner.invoke(app, ["score", "--golds", str(golds), "--preds", str(preds)])
    assert result.exit_code == 2
    assert str(preds) in result.output.replace("\n", "") and "missing 1 (2002)" in result.output
