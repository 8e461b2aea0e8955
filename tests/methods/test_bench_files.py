"""The benchmark on files people already have: LaMP (outputs file LaMP's scorer accepts) and PEFT-U."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tailorlm.cli import app

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"
runner = CliRunner()


@pytest.mark.parametrize(
    ("task", "folder", "split"), [("lamp:2", "lamp/lamp2", "dev"), ("lamp:3", "lamp/lamp3_time", "dev")]
)
def test_bench_on_lamp_files_writes_outputs_lamp_accepts(task, folder, split, tmp_path):
    data = FIXTURES / folder
    result = runner.invoke(
        app,
        [
            "bench",
            "--task",
            task,
            "--data",
            str(data),
            "--split",
            split,
            "--model",
            "tiny",
            "--full",
            "--methods",
            "zero-shot,user-majority",
            "--out",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert set(results["methods"]) == {"zero-shot", "user-majority"}
    outputs = tmp_path / "lamp" / "zero-shot.json"
    assert json.loads(outputs.read_text())["task"].startswith("LaMP")
    scored = runner.invoke(
        app, ["score", "--golds", str(data / f"{split}_outputs.json"), "--preds", str(outputs), "--json"]
    )
    assert scored.exit_code == 0, scored.output


def test_bench_on_a_peftu_folder(tmp_path):
    result = runner.invoke(
        app,
        [
            "bench",
            "--task",
            "peftu:hatexplain",
            "--data",
            str(FIXTURES / "peftu" / "hatexplain"),
            "--model",
            "tiny",
            "--full",
            "--methods",
            "zero-shot,few-shot,user-majority",
            "--out",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert all(m["complete"] for m in results["methods"].values())


def test_bench_reports_a_missing_data_folder_without_traceback(tmp_path):
    result = runner.invoke(
        app, ["bench", "--task", "lamp:2", "--data", str(tmp_path / "nope"), "--model", "tiny"]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
