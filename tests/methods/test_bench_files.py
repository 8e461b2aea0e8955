"""The benchmark on files people already have: LaMP (outputs file LaMP's scorer accepts) and PEFT-U, with
the scores of the rule-based baselines computed by hand from the fixture files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tailorlm.cli import app

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"
runner = CliRunner()


def _bench(task: str, data: Path, methods: str, out: Path, split: str | None = None) -> dict:
    args = ["bench", "--task", task, "--data", str(data), "--model", "tiny", "--full"]
    args += ["--methods", methods, "--out", str(out), "--json"]
    if split:
        args += ["--split", split]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _metric(results: dict, method: str, name: str) -> dict:
    return results["methods"][method]["metrics"][name]


def _lamp_score(data: Path, split: str, outputs: Path) -> dict:
    scored = runner.invoke(
        app, ["score", "--golds", str(data / f"{split}_outputs.json"), "--preds", str(outputs), "--json"]
    )
    assert scored.exit_code == 0, scored.output
    return json.loads(scored.stdout)


def test_bench_on_lamp2_files_scores_and_writes_outputs_lamp_accepts(tmp_path):
    data = FIXTURES / "lamp" / "lamp2"
    results = _bench("lamp:2", data, "zero-shot,user-majority", tmp_path, split="dev")
    assert set(results["methods"]) == {"zero-shot", "user-majority"}
    # Each question is its own user, answered with its most frequent profile tag. Every tag appears once
    # over all profiles (romance, sci-fi, twist ending; action, comedy), so ties go to the order of the
    # task's tag list: 2001 -> sci-fi (gold sci-fi, right), 2002 -> comedy (gold action, wrong).
    accuracy = _metric(results, "user-majority", "accuracy")
    assert accuracy["pooled"] == pytest.approx(1 / 2) and accuracy["user_mean"] == pytest.approx(1 / 2)
    # Macro-F1 over the 15 tags: sci-fi scores 1, every other tag 0.
    assert _metric(results, "user-majority", "f1")["pooled"] == pytest.approx(1 / 15)
    for method in ("zero-shot", "user-majority"):
        outputs = tmp_path / "lamp" / f"{method}.json"
        assert json.loads(outputs.read_text())["task"].startswith("LaMP")
        scored = _lamp_score(data, "dev", outputs)
        if method == "user-majority":
            assert scored["pooled"]["accuracy"] == pytest.approx(1 / 2)


def test_bench_on_lamp3_files_scores_ratings(tmp_path):
    data = FIXTURES / "lamp" / "lamp3_time"
    results = _bench("lamp:3", data, "zero-shot,user-majority,user-mean", tmp_path, split="dev")
    # Training ratings (the questions' profile items): alice 2, 5, 3; bob 4, 1. Golds: alice 3101 -> 4,
    # 3102 -> 1; bob 3201 -> 3. Every rating appears once over all users, so ties go to 1, 2, 3, 4, 5.
    # user-majority: alice 2 (errors 2, 1), bob 1 (error 2): pooled MAE 5/3; per-user (1.5 + 2) / 2.
    mae = _metric(results, "user-majority", "mae")
    assert mae["pooled"] == pytest.approx(5 / 3) and mae["user_mean"] == pytest.approx(1.75)
    # user-mean, on positions 0-4: alice (1 + 4 + 2) / 3 = 2.33 -> 2, rating 3 (errors 1, 2); bob
    # (3 + 0) / 2 = 1.5 -> 2 (round half to even), rating 3 (error 0): pooled 3/3, per-user (1.5 + 0) / 2.
    mae = _metric(results, "user-mean", "mae")
    assert mae["pooled"] == pytest.approx(1.0) and mae["user_mean"] == pytest.approx(0.75)
    scored = _lamp_score(data, "dev", tmp_path / "lamp" / "user-mean.json")
    assert scored["pooled"]["mae"] == pytest.approx(1.0)


def test_bench_on_a_peftu_folder(tmp_path):
    methods = "zero-shot,few-shot,user-majority,item-majority"
    results = _bench("peftu:hatexplain", FIXTURES / "peftu" / "hatexplain", methods, tmp_path)
    assert all(m["complete"] for m in results["methods"].values())
    # Training labels: user 2 normal x2, offensive, hatespeech; user 7 normal, hatespeech; user 10
    # normal x2, offensive. Over everyone: normal 5, hatespeech 2, offensive 2.
    # user-majority answers "normal" to all: 2's p06 (hatespeech) wrong, 7's p05 (offensive) wrong (a
    # tie, broken by "normal" being most frequent overall), 10's p03 (offensive) wrong, p04 (normal) right.
    # item-majority: p06 <- offensive (user 10's answer; gold hatespeech), p05 <- normal (user 10;
    # gold offensive), p03 <- hatespeech (users 2 and 7; gold offensive), p04 <- normal (user 2; right).
    # Both: 1 of 4 answers right; per user 0, 0 and 1/2, a mean of 1/6.
    for method in ("user-majority", "item-majority"):
        for name in ("accuracy", "lenient_accuracy"):
            value = _metric(results, method, name)
            assert value["pooled"] == pytest.approx(1 / 4), (method, name)
            assert value["user_mean"] == pytest.approx(1 / 6), (method, name)
    lines = (tmp_path / "predictions" / "item-majority.jsonl").read_text().splitlines()
    answers = {e["id"]: e["prediction"] for line in lines for e in json.loads(line)["examples"]}
    assert answers == {"2/p06": "offensive", "7/p05": "normal", "10/p03": "hatespeech", "10/p04": "normal"}


def test_bench_reports_a_missing_data_folder_without_traceback(tmp_path):
    result = runner.invoke(
        app, ["bench", "--task", "lamp:2", "--data", str(tmp_path / "nope"), "--model", "tiny"]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
