"""results.json: per-method metrics, intervals over users and paired tests, on synthetic run folders with
planted differences."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bench_helpers import (
    CLASSIFICATION,
    METHODS,
    N_USERS,
    PARTIAL_USERS,
    RATING,
    line,
    no_reference_run,
    write_run,
)

from tailorlm.bench.results import ReportError, summarize

# --- numbers -----------------------------------------------------------------------------------------------


def test_tiny_case_matches_hand_computed_values(tmp_path):
    users = {"u1": {"history": 4}, "u2": {"history": 9}}
    lines = {
        "zero-shot": [
            line("u1", ["no", "yes", "no"], ["no", "no", "no"], seconds=1.5),
            line("u2", ["yes", "yes"], ["yes", "maybe"], seconds=0.5),
        ]
    }
    task = {**CLASSIFICATION, "labels": ["no", "yes"], "metrics": ["accuracy", "f1"]}
    root = write_run(tmp_path, task, {"zero-shot": METHODS["zero-shot"]}, users, lines)
    method = summarize(root)["methods"]["zero-shot"]
    accuracy, f1 = method["metrics"]["accuracy"], method["metrics"]["f1"]
    assert accuracy["pooled"] == pytest.approx(3 / 5)
    assert accuracy["user_mean"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert method["per_user"]["accuracy"] == pytest.approx({"u1": 2 / 3, "u2": 1 / 2})
    # pooled macro-F1: "no" P=2/3 R=1 -> 0.8; "yes" P=1 R=1/3 -> 0.5. Per user only the labels met count:
    # u1 ("no" 0.8, "yes" 0) -> 0.4; u2 ("yes" P=1 R=1/2 -> 2/3).
    assert f1["pooled"] == pytest.approx((0.8 + 0.5) / 2)
    assert f1["user_mean"] == pytest.approx((0.4 + 2 / 3) / 2)
    assert (method["n_users"], method["n_examples"], method["seconds"]) == (2, 5, 2.0)
    assert method["complete"] and method["users_done"] == 2


def test_intervals_contain_the_mean(planted):
    _, results = planted
    for method in results["methods"].values():
        for name, value in method["metrics"].items():
            assert value["ci_low"] <= value["user_mean"] <= value["ci_high"]
            varies = len(set(method["per_user"][name].values())) > 1
            assert (value["ci_low"] < value["ci_high"]) == varies


def test_planted_better_method_is_significant_and_the_equal_one_is_not(planted):
    _, results = planted
    methods = results["methods"]
    assert results["references"] == {
        "non_personal": "zero-shot",
        "simple_baseline": "user-majority",
        "prompt_personal": "few-shot",
    }
    assert methods["peft-lora"]["comparisons"]["prompt_personal"]["significant"]
    assert methods["few-shot"]["comparisons"]["prompt_personal"]["status"] == "self"
    better = methods["peft-lora"]["comparisons"]["non_personal"]
    assert better["status"] == "compared" and better["significant"] and better["p_value"] < 0.01
    assert better["delta"] == pytest.approx(0.3) and better["n_users"] == N_USERS
    equal = methods["few-shot"]["comparisons"]["non_personal"]
    assert equal["delta"] == pytest.approx(0.0) and not equal["significant"] and equal["p_value"] > 0.3
    assert methods["zero-shot"]["comparisons"]["non_personal"]["status"] == "self"
    assert methods["zero-shot"]["comparisons"]["simple_baseline"]["significant"]
    assert results["ranking"][-1] == "user-majority"


def test_gain_per_user_is_paired_with_history(planted):
    _, results = planted
    gains = results["methods"]["peft-lora"]["gain_vs_non_personal"]
    assert len(gains) == N_USERS
    assert all(g["gain"] == pytest.approx(0.3) for g in gains)
    assert gains[2] == {"user": "u02", "history": 13, "gain": pytest.approx(0.3)}
    assert results["methods"]["zero-shot"]["gain_vs_non_personal"] == []


def test_partial_method_is_flagged_and_compared_on_shared_users(planted):
    # The report's sentence about it: test_report_reading.py.
    _, results = planted
    oppu = results["methods"]["oppu"]
    assert not oppu["complete"] and oppu["users_done"] == PARTIAL_USERS
    assert len(oppu["missing_users"]) == N_USERS - PARTIAL_USERS
    assert oppu["comparisons"]["non_personal"]["n_users"] == PARTIAL_USERS
    assert any("oppu: partial" in w for w in results["warnings"])


def test_results_are_deterministic_and_stored(planted):
    root, results = planted
    assert json.loads((root / "results.json").read_text()) == json.loads(json.dumps(results))
    assert summarize(root) == results


def test_rating_task_lower_is_better(tmp_path):
    rng = np.random.default_rng(3)
    users = {f"r{i}": {"history": 10 + i} for i in range(N_USERS)}
    lines: dict[str, list[dict | str]] = {"zero-shot": [], "peft-lora": [], "user-mean": []}
    for user in users:
        golds = [str(int(x)) for x in rng.integers(1, 6, 8)]
        lines["zero-shot"].append(line(user, golds, ["3"] * 8))
        near = [g if i % 2 else str(min(5, int(g) + 1)) for i, g in enumerate(golds)]
        lines["peft-lora"].append(line(user, golds, near))
        lines["user-mean"].append(line(user, golds, ["not a number"] * 8))
    methods = {
        "zero-shot": METHODS["zero-shot"],
        "peft-lora": METHODS["peft-lora"],
        "user-mean": {"family": "simple-baseline", "decoding": "rule"},
    }
    results = summarize(write_run(tmp_path, RATING, methods, users, lines))
    assert results["primary_metric"] == "mae" and results["lower_is_better"]
    assert results["ranking"] == ["peft-lora", "zero-shot", "user-mean"]
    better = results["methods"]["peft-lora"]["comparisons"]["non_personal"]
    assert better["delta"] < 0 < better["gain"] and better["significant"]
    worse = results["methods"]["user-mean"]["comparisons"]["non_personal"]
    assert worse["delta"] > 0 and not worse["significant"] and worse["p_value"] > 0.9
    assert all(g["gain"] > -1e-12 for g in results["methods"]["peft-lora"]["gain_vs_non_personal"])


def test_a_likert_run_is_scored_by_position_on_its_scale(tmp_path):
    # The run that once ended in "could not convert string to float": text ratings, listed in order.
    likert = ["very inaccurate", "moderately inaccurate", "neither", "moderately accurate", "very accurate"]
    task = {**RATING, "name": "table:bfi-words", "labels": likert}
    users = {"u1": {"history": 2}, "u2": {"history": 2}}
    lines: dict[str, list[dict | str]] = {
        # u1: positions 5, 2 answered 4, 2 -> errors 1, 0; u2: 1 answered "no idea" -> the far end 5, error 4
        "user-mean": [
            line(
                "u1",
                ["very accurate", "moderately inaccurate"],
                ["moderately accurate", "moderately inaccurate"],
            ),
            line("u2", ["very inaccurate"], ["no idea"]),
        ]
    }
    method = summarize(write_run(tmp_path, task, {"user-mean": METHODS["user-majority"]}, users, lines))
    method = method["methods"]["user-mean"]
    assert method["failed"] is None and method["per_user"]["mae"] == {"u1": 0.5, "u2": 4.0}
    assert method["metrics"]["mae"]["pooled"] == pytest.approx(5 / 3)
    assert method["metrics"]["rmse"]["pooled"] == pytest.approx(np.sqrt(17 / 3))


def test_duplicate_user_lines_last_wins(tmp_path):
    users = {"u1": {"history": 3}, "u2": {"history": 3}}
    lines: dict[str, list[dict | str]] = {
        "zero-shot": [
            line("u1", ["yes", "no"], ["no", "no"], seconds=9.0),
            line("u2", ["yes"], ["yes"], seconds=1.0),
            line("u1", ["yes", "no"], ["yes", "no"], seconds=2.0),
        ]
    }
    root = write_run(tmp_path, CLASSIFICATION, {"zero-shot": METHODS["zero-shot"]}, users, lines)
    method = summarize(root)["methods"]["zero-shot"]
    assert method["per_user"]["accuracy"] == {"u1": 1.0, "u2": 1.0}
    assert (method["seconds"], method["n_examples"], method["users_done"]) == (3.0, 3, 2)


def test_missing_reference_is_stated(tmp_path):
    # What the reading and the written report make of this folder: tests/bench/report/.
    results = summarize(no_reference_run(tmp_path))
    assert results["references"] == {"non_personal": None, "simple_baseline": None, "prompt_personal": None}
    assert results["methods"]["peft-lora"]["comparisons"]["non_personal"]["status"] == "missing"
    assert results["methods"]["few-shot"]["has_results"] is False
    assert results["ranking"] == ["peft-lora", "few-shot"]
    assert any("few-shot: no predictions file" in w for w in results["warnings"])


# --- mistakes ----------------------------------------------------------------------------------------------


def test_missing_or_malformed_run_json(tmp_path):
    with pytest.raises(ReportError, match=r"run\.json: not found"):
        summarize(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"run\.json: not valid JSON"):
        summarize(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"task": {"name": "x", "kind": "poetry"}, "methods": {}}))
    with pytest.raises(ReportError, match="unknown kind 'poetry'"):
        summarize(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"task": {"name": "x", "kind": "rating"}}))
    with pytest.raises(ReportError, match="'methods' is missing"):
        summarize(tmp_path)


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("{broken}\n" + json.dumps(line("u3", ["yes"], ["yes"])), "not valid JSON"),
        (json.dumps({"user": "u2", "seconds": 1}), "'examples' is missing"),
        (json.dumps({"user": "u2", "examples": [{"prediction": "yes"}]}), "example 0: needs 'gold'"),
        (json.dumps(["u2"]), "expected a JSON object"),
    ],
)
def test_a_malformed_prediction_line_fails_its_method_alone_naming_file_and_line(tmp_path, bad, problem):
    lines: dict[str, list[dict | str]] = {
        "zero-shot": [line("u1", ["yes"], ["yes"]), bad],
        "user-majority": [line("u1", ["yes"], ["no"]), line("u2", ["no"], ["no"])],
    }
    users = {"u1": {"history": 1}, "u2": {"history": 1}}
    methods = {"zero-shot": METHODS["zero-shot"], "user-majority": METHODS["user-majority"]}
    results = summarize(write_run(tmp_path, CLASSIFICATION, methods, users, lines))
    failed = results["methods"]["zero-shot"]
    assert "zero-shot.jsonl, line 2" in failed["failed"] and problem in failed["failed"]
    assert not failed["has_results"] and results["ranking"] == ["user-majority", "zero-shot"]
    assert results["methods"]["user-majority"]["metrics"]["accuracy"]["user_mean"] == 0.5
    assert any(w.startswith("zero-shot: failed: ") and "line 2" in w for w in results["warnings"])


def test_a_last_line_cut_short_by_a_kill_is_a_user_not_done(tmp_path):
    cut = json.dumps(line("u2", ["no"], ["no"]))[:-9]
    lines: dict[str, list[dict | str]] = {"zero-shot": [line("u1", ["yes"], ["yes"])]}
    users = {"u1": {"history": 1}, "u2": {"history": 1}}
    root = write_run(tmp_path, CLASSIFICATION, {"zero-shot": METHODS["zero-shot"]}, users, lines)
    with (root / "predictions" / "zero-shot.jsonl").open("a") as handle:
        handle.write(cut)  # no newline: the kill came mid-write
    method = summarize(root)["methods"]["zero-shot"]
    assert method["failed"] is None and method["users_done"] == 1 and method["missing_users"] == ["u2"]


def test_an_unscoreable_method_is_failed_and_the_others_are_scored(tmp_path):
    users = {"u1": {"history": 1}}
    lines: dict[str, list[dict | str]] = {
        "zero-shot": [line("u1", ["three"], ["3"])],
        "peft-lora": [line("u1", ["3"], ["4"])],
    }
    methods = {"zero-shot": METHODS["zero-shot"], "peft-lora": METHODS["peft-lora"]}
    results = summarize(write_run(tmp_path, {**RATING, "labels": None}, methods, users, lines))
    reason = results["methods"]["zero-shot"]["failed"]
    assert "zero-shot.jsonl: cannot score the predictions" in reason and "'three' is not a number" in reason
    assert results["methods"]["peft-lora"]["metrics"]["mae"]["user_mean"] == 1.0
    assert results["references"]["non_personal"] is None  # a failed method is no reference


def test_a_method_that_failed_while_running_is_reported_with_its_reason(tmp_path):
    users = {"u1": {"history": 1}, "u2": {"history": 1}}
    lines: dict[str, list[dict | str]] = {"peft-lora": [line("u1", ["yes"], ["yes"])]}
    methods = {"peft-lora": METHODS["peft-lora"], "zero-shot": METHODS["zero-shot"]}
    root = write_run(tmp_path, CLASSIFICATION, methods, users, lines)
    failures = {"peft-lora": {"reason": "RuntimeError: out of memory", "traceback": "..."}}
    (root / "failures.json").write_text(json.dumps(failures))
    results = summarize(root)
    lora = results["methods"]["peft-lora"]
    # what it finished before failing is still scored, and marked
    assert lora["failed"] == "RuntimeError: out of memory" and lora["has_results"] and lora["users_done"] == 1
    assert "peft-lora: failed: RuntimeError: out of memory" in results["warnings"]
    assert results["methods"]["zero-shot"]["failed"] is None
