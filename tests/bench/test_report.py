"""Run-folder statistics and the report, on synthetic run folders with planted differences."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from tailorlm.bench import report, summary
from tailorlm.bench.summary import ReportError
from tailorlm.cli import app

LABELS = ["no", "perhaps", "yes"]
CLASSIFICATION = {
    "name": "verbagg",
    "kind": "classification",
    "labels": LABELS,
    "metrics": ["accuracy", "f1", "lenient_accuracy"],
    "source": "synthetic",
}
RATING = {
    "name": "lamp:3",
    "kind": "rating",
    "labels": ["1", "2", "3", "4", "5"],
    "metrics": ["mae", "rmse"],
    "source": "synthetic",
}
METHODS = {
    "zero-shot": {"family": "non-personal", "description": "base model", "decoding": "choice"},
    "user-majority": {"family": "simple-baseline", "description": "user's majority", "decoding": "rule"},
    "peft-lora": {"family": "parameter-personal", "description": "LoRA per user", "decoding": "choice"},
    "few-shot": {"family": "prompt-personal", "description": "3 shots", "decoding": "choice"},
    "oppu": {"family": "oppu", "description": "task LoRA + user LoRA", "decoding": "choice"},
}
N_USERS, PER_USER, PARTIAL_USERS = 30, 10, 20


def write_run(root: Path, task: dict, methods: dict, users: dict, lines: dict[str, list[dict | str]]) -> Path:
    """A run folder as the runner writes it; a line given as a string is written verbatim."""
    root.mkdir(parents=True, exist_ok=True)
    run = {"task": task, "config": {"profile": "quick", "seed": 0}, "methods": methods, "users": users}
    (root / "run.json").write_text(json.dumps({**run, "started": "2026-11-22T03:00:00Z"}))
    (root / "predictions").mkdir(exist_ok=True)
    for method, records in lines.items():
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
        (root / "predictions" / f"{method}.jsonl").write_text(text)
    return root


def line(user: str, golds: list[str], preds: list[str], seconds: float = 1.0) -> dict:
    examples = [
        {"id": f"{user}/{i}", "gold": g, "golds": [g], "prediction": p}
        for i, (g, p) in enumerate(zip(golds, preds, strict=True))
    ]
    return {"user": user, "seconds": seconds, "examples": examples}


def answers(golds: list[str], correct: int) -> list[str]:
    """The first ``correct`` answers right, the rest a wrong label."""
    return [g if i < correct else LABELS[(LABELS.index(g) + 1) % 3] for i, g in enumerate(golds)]


def planted_run(root: Path) -> Path:
    """zero-shot right on 3-6 of 10 per user; peft-lora 3 more; few-shot the same on average (one user up,
    one down); user-majority 2 right; oppu like peft-lora but interrupted after 20 users."""
    rng = np.random.default_rng(7)
    users = {
        f"u{i:02d}": {"history": int(5 + 4 * i), "train": 8, "val": 1, "test": PER_USER}
        for i in range(N_USERS)
    }
    lines: dict[str, list[dict | str]] = {name: [] for name in METHODS}
    for index, user in enumerate(users):
        golds = [str(x) for x in rng.choice(LABELS, PER_USER)]
        base = int(rng.integers(3, 7))
        shift = 1 if index == 0 else -1 if index == 1 else 0
        lines["zero-shot"].append(line(user, golds, answers(golds, base)))
        lines["peft-lora"].append(line(user, golds, answers(golds, base + 3), seconds=2.0))
        lines["few-shot"].append(line(user, golds, answers(golds, base + shift)))
        lines["user-majority"].append(line(user, golds, answers(golds, 2), seconds=0.0))
        if index < PARTIAL_USERS:
            lines["oppu"].append(line(user, golds, answers(golds, base + 3)))
    return write_run(root, CLASSIFICATION, METHODS, users, lines)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict]:
    root = planted_run(tmp_path_factory.mktemp("planted") / "run")
    return root, summary.write_results(root)


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
    method = summary.summarize(root)["methods"]["zero-shot"]
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
    _, results = planted
    oppu = results["methods"]["oppu"]
    assert not oppu["complete"] and oppu["users_done"] == PARTIAL_USERS
    assert len(oppu["missing_users"]) == N_USERS - PARTIAL_USERS
    assert oppu["comparisons"]["non_personal"]["n_users"] == PARTIAL_USERS
    assert any("oppu: partial" in w for w in results["warnings"])
    assert "oppu" in report.reading(results) and "Partial methods" in report.reading(results)


def test_results_are_deterministic_and_stored(planted):
    root, results = planted
    assert json.loads((root / "results.json").read_text()) == json.loads(json.dumps(results))
    assert summary.summarize(root) == results


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
    results = summary.summarize(write_run(tmp_path, RATING, methods, users, lines))
    assert results["primary_metric"] == "mae" and results["lower_is_better"]
    assert results["ranking"] == ["peft-lora", "zero-shot", "user-mean"]
    better = results["methods"]["peft-lora"]["comparisons"]["non_personal"]
    assert better["delta"] < 0 < better["gain"] and better["significant"]
    worse = results["methods"]["user-mean"]["comparisons"]["non_personal"]
    assert worse["delta"] > 0 and not worse["significant"] and worse["p_value"] > 0.9
    assert all(g["gain"] > -1e-12 for g in results["methods"]["peft-lora"]["gain_vs_non_personal"])


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
    method = summary.summarize(root)["methods"]["zero-shot"]
    assert method["per_user"]["accuracy"] == {"u1": 1.0, "u2": 1.0}
    assert (method["seconds"], method["n_examples"], method["users_done"]) == (3.0, 3, 2)


def test_missing_reference_is_stated(tmp_path):
    users = {"u1": {"history": 3}}
    lines: dict[str, list[dict | str]] = {"peft-lora": [line("u1", ["yes"], ["yes"])]}
    root = write_run(
        tmp_path, CLASSIFICATION, {"peft-lora": METHODS["peft-lora"], "few-shot": {}}, users, lines
    )
    results = summary.summarize(root)
    assert results["references"] == {"non_personal": None, "simple_baseline": None, "prompt_personal": None}
    assert results["methods"]["peft-lora"]["comparisons"]["non_personal"]["status"] == "missing"
    assert results["methods"]["few-shot"]["has_results"] is False
    assert results["ranking"] == ["peft-lora", "few-shot"]
    assert "nothing was compared" in report.reading(results)
    assert any("few-shot: no predictions file" in w for w in results["warnings"])
    paths = report.write_report(root)
    assert paths["html"].read_text().count('<img src="data:image/png;base64,') == 3


# --- the report --------------------------------------------------------------------------------------------


def test_report_html_is_self_contained(planted):
    root, results = planted
    paths = report.write_report(root, results)
    page = paths["html"].read_text()
    assert page.count('<img src="data:image/png;base64,') == 3
    for asset in ('src="http', "src='http", 'href="http', "<script", "<link", "url("):
        assert asset not in page
    assert "partial" in page and "peft-lora" in page
    markdown = paths["markdown"].read_text()
    assert "## Reading" in markdown and "oppu (partial)" in markdown
    assert all(paths[f"plot_{key}"].read_bytes().startswith(b"\x89PNG") for key in report.PLOTS)


def test_reading_states_only_what_the_numbers_show(planted):
    _, results = planted
    text = report.reading(results)
    assert text.startswith(f"5 of 5 methods have results on verbagg ({N_USERS} test users")
    assert "ranks first" in text
    assert "peft-lora (+0.300" in text and "few-shot (+0.000" not in text


def test_console_table_lists_every_method(planted):
    _, results = planted
    console = Console(record=True, width=250)
    console.print(report.console_table(results))
    shown = console.export_text()
    assert all(name in shown for name in METHODS) and "partial" in shown


# --- mistakes ----------------------------------------------------------------------------------------------


def test_missing_or_malformed_run_json(tmp_path):
    with pytest.raises(ReportError, match=r"run\.json: not found"):
        summary.summarize(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"run\.json: not valid JSON"):
        summary.summarize(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"task": {"name": "x", "kind": "poetry"}, "methods": {}}))
    with pytest.raises(ReportError, match="unknown kind 'poetry'"):
        summary.summarize(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"task": {"name": "x", "kind": "rating"}}))
    with pytest.raises(ReportError, match="'methods' is missing"):
        summary.summarize(tmp_path)


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("{broken", "not valid JSON"),
        (json.dumps({"user": "u2", "seconds": 1}), "'examples' is missing"),
        (json.dumps({"user": "u2", "examples": [{"prediction": "yes"}]}), "example 0: needs 'gold'"),
        (json.dumps(["u2"]), "expected a JSON object"),
    ],
)
def test_malformed_prediction_line_names_file_and_line(tmp_path, bad, problem):
    lines: dict[str, list[dict | str]] = {"zero-shot": [line("u1", ["yes"], ["yes"]), bad]}
    users = {"u1": {"history": 1}, "u2": {"history": 1}}
    root = write_run(tmp_path, CLASSIFICATION, {"zero-shot": METHODS["zero-shot"]}, users, lines)
    with pytest.raises(ReportError) as caught:
        summary.summarize(root)
    assert "zero-shot.jsonl, line 2" in str(caught.value) and problem in str(caught.value)


def test_unscoreable_gold_is_a_report_error(tmp_path):
    users = {"u1": {"history": 1}}
    lines: dict[str, list[dict | str]] = {"zero-shot": [line("u1", ["three"], ["3"])]}
    root = write_run(tmp_path, RATING, {"zero-shot": METHODS["zero-shot"]}, users, lines)
    with pytest.raises(ReportError, match=r"zero-shot\.jsonl: cannot score"):
        summary.summarize(root)


# --- command line ------------------------------------------------------------------------------------------


def test_cli_report_json_parses(planted):
    root, results = planted
    result = CliRunner().invoke(app, ["report", str(root), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ranking"] == results["ranking"] and payload["primary_metric"] == "accuracy"
    assert not any(isinstance(v, float) and math.isnan(v) for v in payload["methods"]["oppu"]["metrics"])
    assert (root / "report.html").is_file() and (root / "report.md").is_file()


def test_cli_report_error_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "error:" in result.output and "run.json" in result.output and "Traceback" not in result.output
