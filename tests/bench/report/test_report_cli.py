"""``tailorlm report``: the console table, --json output and one-line errors.

The console table lives in tailorlm/cli/report_table.py; its tests sit here with the report's, as the
data commands' tests sit in tests/data.
"""

from __future__ import annotations

import json
import math

from bench_helpers import METHODS
from rich.console import Console
from typer.testing import CliRunner

from tailorlm.cli import app
from tailorlm.cli.report_table import console_table


def test_console_table_lists_every_method(planted):
    _, results = planted
    console = Console(record=True, width=250)
    console.print(console_table(results))
    shown = console.export_text()
    assert all(name in shown for name in METHODS) and "partial" in shown


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
