"""The end-of-run console table of a benchmark, printed by ``tailorlm bench`` and ``tailorlm report``.

Console output belongs to the command line, so the table lives here rather than in ``tailorlm.bench``; its
cells are formatted by ``tailorlm.bench.report.tables`` so they read as in report.md. Import it inside a
command: it pulls in the report package, and with it matplotlib, which ``tailorlm --help`` should not pay for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
from rich.table import Table

from tailorlm.bench.report.tables import (
    REFERENCE_TITLES,
    Results,
    comparison_cell,
    num,
    p_text,
    sense,
    users_cell,
)
from tailorlm.bench.results import ALPHA, LEVEL


def console_table(results: Results) -> Table:
    """The end-of-run summary: methods best first on the primary metric, with the reference tests."""
    primary, refs = results["primary_metric"], results["references"]
    grid = Table(
        title=f"{results['task']['name']}: {primary} ({sense(results)}, per-user mean)",
        caption=f"vs: delta = method - reference, one-sided paired bootstrap p; * significantly better "
        f"(p < {ALPHA})",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
    )
    # Narrow enough for an 80-column terminal: family and pooled values are in the report; the method name is
    # what the reader scans for, so it never wraps.
    grid.add_column("#", justify="right")
    grid.add_column("method", no_wrap=True)
    for column in [primary, f"{LEVEL:.0%} CI"]:
        grid.add_column(column, no_wrap=True)
    grid.add_column("users", min_width=7)
    grid.add_column("sec", justify="right", no_wrap=True)
    for key in REFERENCE_TITLES:
        grid.add_column(f"vs {refs[key] or 'no ' + key.replace('_', '-')}", min_width=8)
    for rank, name in enumerate(results["ranking"], start=1):
        method = results["methods"][name]
        m = method["metrics"].get(primary)
        grid.add_row(
            str(rank) if method["has_results"] else "-",
            name,
            num(m["user_mean"]) if m else "-",
            f"{num(m['ci_low'])}-{num(m['ci_high'])}" if m else "-",
            users_cell(method),
            f"{method['seconds']:.0f}",
            *(_console_comparison(method["comparisons"][key]) for key in REFERENCE_TITLES),
        )
    return grid


def _console_comparison(comparison: Mapping[str, Any]) -> str:
    # Two lines per cell, delta (starred when significant) over p, to keep the reference columns narrow.
    if comparison["status"] == "self":
        return "(ref)"
    if comparison["status"] != "compared":
        return comparison_cell(comparison)
    mark = " [bold green]*[/]" if comparison["significant"] else ""
    return f"{comparison['delta']:+.3f}{mark}\n{p_text(comparison['p_value'])}"
