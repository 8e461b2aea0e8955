"""``tailorlm report RUN_DIR``: statistics and the report of a benchmark run folder."""

from __future__ import annotations

from pathlib import Path

import typer

from tailorlm.cli import app, console
from tailorlm.cli.common import JSON_OPTION, user_errors


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="A benchmark run folder (with run.json and predictions/)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Recompute results.json, rewrite report.md and report.html, and print the methods table."""
    # Imported here so that `tailorlm --help` does not pay for matplotlib.
    from tailorlm.bench.report import write_report
    from tailorlm.bench.results import ReportError, write_results
    from tailorlm.cli.report_table import console_table

    with user_errors(ReportError):
        results = write_results(run_dir)
        written = write_report(run_dir, results)

    def render(payload: dict) -> None:
        console.out.print(console_table(payload))
        for line in payload["warnings"]:
            console.err.print(f"note: {line}", highlight=False)
        console.err.print(f"wrote {written['markdown']} and {written['html']}", highlight=False)

    console.emit(results, as_json, render)
