"""``report.md``: the report as markdown, with the plots linked as PNG files next to it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tailorlm.bench.report.activity import activity_caption, activity_notes, activity_rows, by_activity
from tailorlm.bench.report.plots import PLOTS
from tailorlm.bench.report.reading import reading
from tailorlm.bench.report.tables import (
    Results,
    comparison_rows,
    method_rows,
    notes,
    sense,
    setting_rows,
    timing_rows,
    users_needed_caption,
    users_needed_rows,
)
from tailorlm.bench.results import ALPHA


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def _timing_section(results: Results) -> list[str]:
    headers, rows = timing_rows(results)
    if not rows:
        return []
    cuts = dict((results.get("timing") or {}).get("budget_cuts") or {})
    left_out = cuts.pop("left_out", [[], []])[1]
    parts = [f"{name} {asked} -> {got}" for name, (asked, got) in cuts.items()]
    if left_out:
        parts.append(
            f"left out {', '.join(left_out)} (fully capped, the run was still over its budget; each "
            "family of methods asked for keeps a method, and `--budget 0` runs them all)"
        )
    said = "; ".join(parts)
    return [
        "## Time: estimate against actual",
        "The work estimate made before the run (timed on this machine through the methods' own calls) "
        "against what each method then took. "
        + (f"The time budget cut: {said}." if said else "The time budget cut nothing."),
        _md_table(headers, rows),
    ]


def _users_needed_section(results: Results) -> list[str]:
    headers, rows = users_needed_rows(results)
    if not rows:
        return []
    return ["## Users needed", users_needed_caption(results), _md_table(headers, rows)]


def render_markdown(results: Results, plot_files: Mapping[str, str]) -> str:
    """The report as markdown; ``plot_files`` maps plot keys to paths relative to the report."""
    activity = by_activity(results)
    by_activity_parts = (
        []
        if activity is None
        else [
            "## By activity",
            activity_caption(activity, results),
            _md_table(*activity_rows(activity, results)),
        ]
    )
    parts = [
        f"# Benchmark report: {results['task']['name']}",
        "## Reading",
        reading(results),
        "## Methods",
        f"Sorted by {results['primary_metric']} ({sense(results)}). A method marked partial did not finish "
        "every test user.",
        _md_table(*method_rows(results)),
        "## Against the references",
        f"One-sided paired bootstrap over the users both methods have; delta = method - reference in "
        f"{results['primary_metric']}; significant at p < {ALPHA}.",
        _md_table(*comparison_rows(results)),
        *_users_needed_section(results),
        *by_activity_parts,
        "## Plots",
        *(f"![{PLOTS[key][0]}]({path})" for key, path in plot_files.items()),
        *_timing_section(results),
        "## Task and configuration",
        _md_table(["setting", "value"], setting_rows(results)),
        "## Notes",
        "\n".join(f"- {note}" for note in notes(results, activity_notes(activity))),
    ]
    return "\n\n".join(parts) + "\n"
