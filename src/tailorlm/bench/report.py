"""The benchmark report: ``report.md``, a self-contained ``report.html`` and the end-of-run console table.

Everything shown is read from the results ``summary.summarize`` computes; the "reading" paragraph is built
from those numbers only, so it can say no more than they do. The HTML embeds its plots as base64 PNG and
its CSS inline, so the one file can be mailed or archived without the run folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich import box
from rich.table import Table

from tailorlm.bench.summary import ALPHA, LEVEL, REFERENCES, write_results

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
PLOTS_DIR = "plots"
FAMILY_COLOURS: dict[str, str] = {
    "simple-baseline": "#7f7f7f",
    "non-personal": "#1f77b4",
    "prompt-personal": "#2ca02c",
    "parameter-personal": "#d62728",
    "oppu": "#9467bd",
}
OTHER_COLOUR = "#bcbd22"
REFERENCE_TITLES: dict[str, str] = {
    "non_personal": "the best non-personal method",
    "simple_baseline": "the best simple baseline",
    "prompt_personal": "the best prompt-side personal method",
}
_LISTED = 8  # names spelled out in a sentence before "and N more"

Results = Mapping[str, Any]


# --- small formatting helpers ------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, OTHER_COLOUR)


def _scored(results: Results) -> list[str]:
    return [name for name in results["ranking"] if results["methods"][name]["has_results"]]


def _users_cell(method: Mapping[str, Any]) -> str:
    done = f"{method['users_done']}/{method['users_expected']}"
    return done if method["complete"] else f"{done} (partial)"


def _ci_cell(summary: Mapping[str, float]) -> str:
    return f"{_num(summary['user_mean'])} [{_num(summary['ci_low'])}, {_num(summary['ci_high'])}]"


def _comparison_cell(comparison: Mapping[str, Any]) -> str:
    status = comparison["status"]
    if status == "compared":
        verdict = "significant" if comparison["significant"] else "not significant"
        return f"{_delta_p(comparison)}, {verdict} (n={comparison['n_users']})"
    return {
        "self": "(reference)",
        "missing": "no reference",
        "no-results": "no results",
        "no-common-users": "no shared users",
    }.get(status, status)


def _p(value: float) -> str:
    # The bootstrap p-value has a floor of 1/(resamples + 1): below 0.001 its digits say nothing more.
    return "p<0.001" if value < 0.001 else f"p={value:.3f}"


def _delta_p(comparison: Mapping[str, Any]) -> str:
    return f"{comparison['delta']:+.3f}, {_p(comparison['p_value'])}"


def _beats(comparison: Mapping[str, Any]) -> str:
    if comparison["status"] != "compared":
        return "-"
    return "yes" if comparison["significant"] else "no"


def _series(names: Sequence[str], limit: int = _LISTED) -> str:
    shown = list(names[:limit])
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


# --- tables (one set of rows for markdown, HTML and the console) -------------------------------------------


def method_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """The methods table, best first: family, decoding, each metric's per-user mean [CI] and pooled value,
    users done and seconds."""
    headers = ["#", "method", "family", "decoding"]
    for name in results["metrics"]:
        headers += [f"{name} (user mean [{LEVEL:.0%} CI])", f"{name} pooled"]
    headers += ["users", "examples", "seconds"]
    rows = []
    for rank, name in enumerate(results["ranking"], start=1):
        method = results["methods"][name]
        row = [str(rank) if method["has_results"] else "-", _label(results, name), method["family"]]
        row.append(method["decoding"])
        for metric in results["metrics"]:
            summary = method["metrics"].get(metric)
            row += [_ci_cell(summary), _num(summary["pooled"])] if summary else ["-", "-"]
        row += [_users_cell(method), str(method["n_examples"]), _num(method["seconds"], 1)]
        rows.append(row)
    return headers, rows


def comparison_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Per method: does it beat each reference significantly, with delta (method - reference) and p.
    A reference family without results gets no columns (the reading says so)."""
    refs = results["references"]
    keys = [key for key in REFERENCE_TITLES if refs.get(key)]
    headers = ["method"]
    for key in keys:
        headers += [f"beats {refs[key]}?", f"vs {refs[key]}: delta, p"]
    rows = []
    for name in results["ranking"]:
        comparisons = results["methods"][name]["comparisons"]
        row = [_label(results, name)]
        for key in keys:
            row += [_beats(comparisons[key]), _comparison_cell(comparisons[key])]
        rows.append(row)
    return headers, rows


def setting_rows(results: Results) -> list[list[str]]:
    task = results["task"]
    rows = [
        ["task", str(task["name"])],
        ["kind", str(task["kind"])],
        ["labels", ", ".join(task["labels"]) if task.get("labels") else "-"],
        [
            "metrics",
            f"{', '.join(results['metrics'])} (primary: {results['primary_metric']}, {_sense(results)})",
        ],
        ["source", str(task.get("source", "-"))],
        ["test users", str(results["users_in_run"])],
        ["started", str(results.get("started") or "-")],
    ]
    for key, value in results["config"].items():
        rows.append([f"config.{key}", value if isinstance(value, str) else json.dumps(value)])
    stats = results["statistics"]
    rows.append(
        [
            "statistics",
            f"{stats['ci_level']:.0%} percentile bootstrap CI over users "
            f"({stats['ci_resamples']} resamples); {stats['test']} ({stats['paired_resamples']} resamples), "
            f"significant at p < {stats['alpha']}; seed {stats['seed']}",
        ]
    )
    return rows


def _sense(results: Results) -> str:
    return "lower is better" if results["lower_is_better"] else "higher is better"


# --- the reading paragraph ---------------------------------------------------------------------------------


def reading(results: Results) -> str:
    """A short account of what the numbers show: the leader, the significant comparisons, the caveats."""
    scored = _scored(results)
    if not scored:
        return "No method has results yet (no user finished), so there is nothing to read."
    sentences = [_leader_sentence(results, scored)]
    sentences += [_reference_sentence(results, scored, key) for key in REFERENCE_TITLES]
    sentences += _caveats(results, scored)
    return " ".join(s for s in sentences if s)


def _leader_sentence(results: Results, scored: list[str]) -> str:
    primary, methods = results["primary_metric"], results["methods"]
    best = methods[scored[0]]["metrics"][primary]
    text = (
        f"{len(scored)} of {len(methods)} methods have results on {results['task']['name']} "
        f"({results['users_in_run']} test users in the run). On {primary} ({_sense(results)}, per-user mean) "
        f"{scored[0]} ranks first with {_num(best['user_mean'])} ({LEVEL:.0%} CI {_num(best['ci_low'])} to "
        f"{_num(best['ci_high'])}, {methods[scored[0]]['n_users']} users)."
    )
    if not methods[scored[0]]["complete"]:
        text += " It is partial, so that mean is over a subset of the users the others were scored on."
    if len(scored) > 1:
        second = methods[scored[1]]["metrics"][primary]
        overlap = second["ci_high"] >= best["ci_low"] and best["ci_high"] >= second["ci_low"]
        if np.isclose(second["user_mean"], best["user_mean"], rtol=0.0, atol=1e-12):
            verdict = "the same mean, so the two are tied and listed by name."
        elif overlap:
            verdict = "their intervals overlap, so these users do not settle the order of the two."
        else:
            verdict = "their intervals do not overlap."
        text += f" The runner-up, {scored[1]}, has {_num(second['user_mean'])}; {verdict}"
    return text


def _reference_sentence(results: Results, scored: list[str], key: str) -> str:
    title, ref = REFERENCE_TITLES[key], results["references"][key]
    if ref is None:
        return f"No {REFERENCES[key]} method has results, so nothing was compared with {title}."
    methods = results["methods"]
    compared = [n for n in scored if methods[n]["comparisons"][key]["status"] == "compared"]
    if not compared:
        return f"{title.capitalize()} is {ref}; no other method shares users with it."
    winners = [n for n in compared if methods[n]["comparisons"][key]["significant"]]
    mean = methods[ref]["metrics"][results["primary_metric"]]["user_mean"]
    head = f"Against {title}, {ref} ({_num(mean)}), "
    if not winners:
        return head + f"none of the {len(compared)} other methods is significantly better (p < {ALPHA})."
    detail = [f"{n} ({_delta_p(methods[n]['comparisons'][key])})" for n in winners]
    return (
        head + f"{len(winners)} of {len(compared)} are significantly better (p < {ALPHA}): {_series(detail)}."
    )


def _caveats(results: Results, scored: list[str]) -> list[str]:
    methods = results["methods"]
    notes = []
    partial = [
        f"{n} ({_users_cell(methods[n]).removesuffix(' (partial)')})"
        for n in methods
        if not methods[n]["complete"]
    ]
    if partial:
        notes.append(
            f"Partial methods: {_series(partial)}; their figures cover only the users they finished, and "
            "every comparison uses only the users both methods have."
        )
    tests = sum(
        methods[n]["comparisons"][k]["status"] == "compared" for n in scored for k in REFERENCE_TITLES
    )
    if tests > 5:
        notes.append(f"No correction for multiple comparisons was applied across the {tests} tests.")
    users = max(methods[n]["n_users"] for n in scored)
    if users < 20:
        notes.append(
            f"With at most {users} users per method the intervals are wide; treat the order as tentative."
        )
    return notes


# --- plots -------------------------------------------------------------------------------------------------


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _new_figure(rows: int) -> tuple[Figure, Any]:
    figure = Figure(figsize=(8.0, max(2.8, 0.38 * rows + 1.4)))
    return figure, figure.add_subplot()


def _nothing(axes: Any, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="#555555")
    axes.set_xticks([])
    axes.set_yticks([])


def _label(results: Results, name: str) -> str:
    return name if results["methods"][name]["complete"] else f"{name} (partial)"


def _legend(axes: Any, **options: Any) -> None:
    # Outside the axes: inside, it would hide the very points the reader is looking for.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, **options)


def _family_legend(axes: Any, families: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=_colour(f), label=f) for f in dict.fromkeys(families)]
    if handles:
        _legend(axes, handles=handles)


def _method_rows_figure(results: Results) -> tuple[Figure, Any, list[str]]:
    """A figure with one row per method that has results; the names come bottom-up so the best is on top."""
    ordered = list(reversed(_scored(results)))
    figure, axes = _new_figure(len(ordered))
    if not ordered:
        _nothing(axes, "no method has results yet")
    return figure, axes, ordered


def plot_methods(results: Results) -> bytes:
    """(a) Each method's per-user mean on the primary metric with its CI, coloured by family, best on top."""
    figure, axes, ordered = _method_rows_figure(results)
    if not ordered:
        return _png(figure)
    methods, primary = results["methods"], results["primary_metric"]
    for y, name in enumerate(ordered):
        m = methods[name]["metrics"][primary]
        error = [[m["user_mean"] - m["ci_low"]], [m["ci_high"] - m["user_mean"]]]
        axes.errorbar(
            m["user_mean"], y, xerr=error, fmt="o", color=_colour(methods[name]["family"]), capsize=3
        )
    ref = results["references"]["non_personal"]
    if ref is not None:
        axes.axvline(methods[ref]["metrics"][primary]["user_mean"], color="#1f77b4", ls=":", lw=1)
    axes.set_yticks(range(len(ordered)), [_label(results, n) for n in ordered])
    axes.set_xlabel(f"{primary}, per-user mean ({_sense(results)}); bars: {LEVEL:.0%} CI over users")
    axes.set_title(f"{results['task']['name']}: methods on {primary}")
    _family_legend(axes, [methods[n]["family"] for n in reversed(ordered)])
    return _png(figure)


def plot_users(results: Results) -> bytes:
    """(b) How each method's per-user values spread: a box per method with the users as jittered dots."""
    figure, axes, ordered = _method_rows_figure(results)
    if not ordered:
        return _png(figure)
    methods, primary = results["methods"], results["primary_metric"]
    values = [np.array(list(methods[n]["per_user"][primary].values())) for n in ordered]
    boxes = axes.boxplot(
        values,
        orientation="horizontal",
        tick_labels=[_label(results, n) for n in ordered],
        patch_artist=True,
        showfliers=False,
        widths=0.6,
    )
    for patch, name in zip(boxes["boxes"], ordered, strict=True):
        patch.set(facecolor=_colour(methods[name]["family"]), alpha=0.35)
    rng = np.random.default_rng(0)  # fixed jitter: the same run draws the same picture
    for position, points in enumerate(values, start=1):
        axes.scatter(
            points, position + rng.uniform(-0.18, 0.18, points.size), s=8, color="#333333", alpha=0.5
        )
    axes.set_xlabel(f"{primary} per user ({_sense(results)})")
    axes.set_title(f"{results['task']['name']}: spread over users")
    return _png(figure)


def plot_gain(results: Results) -> bytes:
    """(c) Each personal method's per-user gain over the best non-personal method against history size."""
    figure, axes = _new_figure(8)
    ref, methods = results["references"]["non_personal"], results["methods"]
    by_family: dict[str, list[tuple[float, float]]] = {}
    for name in _scored(results):
        if methods[name]["personal"]:
            points = [
                (g["history"], g["gain"])
                for g in methods[name]["gain_vs_non_personal"]
                if g["history"] is not None
            ]
            by_family.setdefault(methods[name]["family"], []).extend(points)
    if ref is None or not any(by_family.values()):
        _nothing(
            axes, "no non-personal reference" if ref is None else "no personal method shares users with it"
        )
        return _png(figure)
    for family, points in by_family.items():
        if points:
            x, y = np.array(points, dtype=float).T
            axes.scatter(x, y, s=14, alpha=0.6, color=_colour(family), label=family)
    axes.axhline(0.0, color="#555555", lw=1)
    axes.set_xlabel("history size of the user (items)")
    axes.set_ylabel(f"gain in {results['primary_metric']} over {ref} (positive = better)")
    axes.set_title(f"{results['task']['name']}: personal methods vs {ref}, per user")
    _legend(axes)
    return _png(figure)


PLOTS: dict[str, tuple[str, Callable[[Results], bytes]]] = {
    "methods": ("Methods on the primary metric with their confidence intervals", plot_methods),
    "users": ("Spread of the per-user values", plot_users),
    "gain": ("Gain over the best non-personal method against history size", plot_gain),
}


# --- markdown and HTML -------------------------------------------------------------------------------------


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def _notes(results: Results) -> list[str]:
    return list(results["warnings"]) or ["none"]


def render_markdown(results: Results, plot_files: Mapping[str, str]) -> str:
    """The report as markdown; ``plot_files`` maps plot keys to paths relative to the report."""
    parts = [
        f"# Benchmark report: {results['task']['name']}",
        "## Reading",
        reading(results),
        "## Methods",
        f"Sorted by {results['primary_metric']} ({_sense(results)}). A method marked partial did not finish "
        "every test user.",
        _md_table(*method_rows(results)),
        "## Against the references",
        f"One-sided paired bootstrap over the users both methods have; delta = method - reference in "
        f"{results['primary_metric']}; significant at p < {ALPHA}.",
        _md_table(*comparison_rows(results)),
        "## Plots",
        *(f"![{PLOTS[key][0]}]({path})" for key, path in plot_files.items()),
        "## Task and configuration",
        _md_table(["setting", "value"], setting_rows(results)),
        "## Notes",
        "\n".join(f"- {note}" for note in _notes(results)),
    ]
    return "\n\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr.partial td { background: #fff4e0; }
.badge { background: #e69500; color: white; border-radius: 3px; padding: 0 0.3em; font-size: 0.8em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; }
p.reading { background: #f6f8fa; padding: 0.8em; border-left: 4px solid #1f77b4; }
"""


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], partial: Sequence[bool] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        cls = ' class="partial"' if index < len(partial) and partial[index] else ""
        cells = "".join(f"<td>{_html_cell(c)}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_cell(cell: str) -> str:
    text = html.escape(str(cell))
    return text.replace(" (partial)", ' <span class="badge">partial</span>')


def render_html(results: Results, pngs: Mapping[str, bytes]) -> str:
    """The report as one HTML file with inline CSS and the plots embedded; no scripts, no external assets."""
    partial = [not results["methods"][n]["complete"] for n in results["ranking"]]
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
        f'alt="{html.escape(PLOTS[key][0])}"><figcaption>{html.escape(PLOTS[key][0])}</figcaption></figure>'
        for key, png in pngs.items()
    )
    title = html.escape(f"Benchmark report: {results['task']['name']}")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in _notes(results))
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{title}</h1>"
        f'<h2>Reading</h2><p class="reading">{html.escape(reading(results))}</p>'
        f"<h2>Methods</h2><p>Sorted by {html.escape(results['primary_metric'])} ({_sense(results)}). "
        "Rows marked partial did not finish every test user.</p>"
        f"{_html_table(*method_rows(results), partial=partial)}"
        f"<h2>Against the references</h2><p>One-sided paired bootstrap over the users both methods have; "
        f"delta = method - reference; significant at p &lt; {ALPHA}.</p>"
        f"{_html_table(*comparison_rows(results), partial=partial)}"
        f"<h2>Plots</h2>{figures}"
        f"<h2>Task and configuration</h2>{_html_table(['setting', 'value'], setting_rows(results))}"
        f"<h2>Notes</h2><ul>{notes}</ul>"
        "</body></html>\n"
    )


def write_report(run_dir: str | Path, results: Results | None = None) -> dict[str, Path]:
    """Write ``report.md`` (with its plots as PNG files) and the self-contained ``report.html``.

    Without ``results`` they are recomputed from the folder and ``results.json`` is rewritten first.
    Returns the written paths by name: results (when recomputed), markdown, html and one per plot.
    """
    run_dir = Path(run_dir)
    written: dict[str, Path] = {}
    if results is None:
        results = write_results(run_dir)
        written["results"] = run_dir / "results.json"
    pngs = {key: draw(results) for key, (_, draw) in PLOTS.items()}
    (run_dir / PLOTS_DIR).mkdir(exist_ok=True)
    for key, png in pngs.items():
        written[f"plot_{key}"] = run_dir / PLOTS_DIR / f"{key}.png"
        written[f"plot_{key}"].write_bytes(png)
    plot_files = {key: f"{PLOTS_DIR}/{key}.png" for key in pngs}
    written["markdown"] = run_dir / MARKDOWN_FILE
    written["markdown"].write_text(render_markdown(results, plot_files), encoding="utf-8")
    written["html"] = run_dir / HTML_FILE
    written["html"].write_text(render_html(results, pngs), encoding="utf-8")
    return written


# --- console -----------------------------------------------------------------------------------------------


def console_table(results: Results) -> Table:
    """The end-of-run summary: methods best first on the primary metric, with the two reference tests."""
    primary, refs = results["primary_metric"], results["references"]
    grid = Table(
        title=f"{results['task']['name']}: {primary} ({_sense(results)}, per-user mean)",
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
            _num(m["user_mean"]) if m else "-",
            f"{_num(m['ci_low'])}-{_num(m['ci_high'])}" if m else "-",
            _users_cell(method),
            f"{method['seconds']:.0f}",
            *(_console_comparison(method["comparisons"][key]) for key in REFERENCE_TITLES),
        )
    return grid


def _console_comparison(comparison: Mapping[str, Any]) -> str:
    if comparison["status"] == "self":
        return "(ref)"
    if comparison["status"] != "compared":
        return _comparison_cell(comparison)
    mark = " [bold green]*[/]" if comparison["significant"] else ""
    return f"{comparison['delta']:+.3f}{mark}\n{_p(comparison['p_value'])}"
