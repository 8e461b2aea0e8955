from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from tailorlm.bench.config import BenchConfig, split_users
from tailorlm.bench.tune import tune
from tailorlm.cli import app
from tailorlm.data import load_task

CONFIG = BenchConfig(model="tiny", test_users=4, adapter_users=6, users_per_step=2)


def test_tune_uses_validation_of_users_neither_tested_nor_in_the_task_adapter():
    result = tune("verbagg", "peft-lora", [1e-3, 1e-2], users=3, epochs=1, config=CONFIG)
    test_users, adapter_users = split_users(load_task("verbagg"), CONFIG)
    assert not set(result["users"]) & {u.id for u in [*test_users, *adapter_users]}
    assert len(result["users"]) == 3
    rows = result["candidates"]
    assert all(0.0 <= row["val_metric"] <= 1.0 and row["users"] == 3 for row in rows)
    best = max(rows, key=lambda r: (r["val_metric"], -r["val_loss"]))
    assert result["best_learning_rate"] == best["learning_rate"]
    assert result["metric"] == "accuracy" and result["decoding"] == "likelihood"


def test_tune_can_select_by_validation_loss():
    result = tune(
        "verbagg",
        "peft-lora",
        [1e-3, 1e-2],
        users=2,
        epochs=1,
        config=CONFIG,
        select_by="loss",
    )
    losses = {row["learning_rate"]: row["val_loss"] for row in result["candidates"]}
    assert result["best_learning_rate"] == min(losses, key=losses.get)


def test_tune_refuses_methods_without_per_user_modules():
    with pytest.raises(ValueError, match="not a per-user module method"):
        tune("verbagg", "zero-shot", [1e-3], config=CONFIG)


def test_tune_command_names_bad_learning_rates():
    result = CliRunner().invoke(app, ["tune", "peft-lora", "--lrs", "fast", "--model", "tiny"])
    assert result.exit_code == 2
    assert "--lrs must be comma-separated numbers" in result.output


def test_tune_command_prints_json():
    result = CliRunner().invoke(
        app,
        ["tune", "peft-ia3", "--lrs", "1e-2", "--users", "2", "--epochs", "1", "--model", "tiny", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "peft-ia3" and len(data["candidates"]) == 1


def test_tune_reads_your_own_table_and_scores_words_by_their_place_on_the_scale(tmp_path):
    likert = ["very inaccurate", "moderately inaccurate", "neither", "moderately accurate", "very accurate"]
    rows = [
        {"who": f"p{u}", "text": f"statement {i}", "answer": likert[(u + i) % 5], "item": f"s{i}"}
        for u in range(12)
        for i in range(10)
    ]
    data = tmp_path / "answers.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    task = tmp_path / "likert.json"
    columns = {"user": "who", "input": "text", "target": "answer", "item": "item"}
    task.write_text(
        json.dumps(
            {
                "name": "likert",
                "kind": "rating",
                "instruction": "How accurate?",
                "labels": likert,
                "columns": columns,
            }
        )
    )
    args = ["tune", "peft-lora", "--task", str(task), "--data", str(data), "--lrs", "1e-3", "--users", "2"]
    result = CliRunner().invoke(
        app, [*args, "--epochs", "1", "--test-users", "4", "--model", "tiny", "--json"]
    )
    assert result.exit_code == 0, result.output
    tuned = json.loads(result.stdout)
    assert tuned["task"] == "table:likert" and tuned["metric"] == "mae"
    assert 0 <= tuned["candidates"][0]["val_metric"] <= 4  # steps on a 1-5 scale


def test_a_rate_that_diverges_is_shown_and_never_chosen_and_all_diverging_is_one_error():
    # At 1e9 every LoRA weight leaves fp16's range in one step: no module is stored for that rate.
    result = tune("verbagg", "peft-lora", [1e9, 1e-3], users=2, epochs=1, config=CONFIG)
    diverged, kept = result["candidates"]
    assert diverged == {"learning_rate": 1e9, "diverged": 2, "users": 2}
    assert kept["learning_rate"] == 1e-3 and result["best_learning_rate"] == 1e-3
    with pytest.raises(ValueError, match="diverged at every learning rate tried"):
        tune("verbagg", "peft-lora", [1e9], users=2, epochs=1, config=CONFIG)
    output = CliRunner().invoke(app, ["tune", "peft-lora", "--model", "tiny", "--lrs", "1e9,1e-3"])
    assert output.exit_code == 0, output.output
    assert "diverged (8/8 users)" in output.output and "<- chosen" in output.output
