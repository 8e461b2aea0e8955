"""``report.html``: the report as one self-contained page.

Its CSS is inline and its plots are embedded as base64 PNG, with no scripts and no external assets, so the
one file can be mailed or archived without the run folder. Named ``html_page``, not ``html``, so that it is
never mistaken for the standard library's ``html`` (which it imports to escape text).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence

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


def _partial(results: Results, names: Iterable[str]) -> list[bool]:
    """Which of these methods' rows to mark as not done for every user."""
    return [not results["methods"][n]["complete"] for n in names]


def render_html(results: Results, pngs: Mapping[str, bytes]) -> str:
    """The report as one HTML file with inline CSS and the plots embedded; no scripts, no external assets.

    ``pngs`` maps plot keys (those of ``PLOTS``) to the PNG bytes to embed.
    """
    partial = _partial(results, results["ranking"])
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
        f'alt="{html.escape(PLOTS[key][0])}"><figcaption>{html.escape(PLOTS[key][0])}</figcaption></figure>'
        for key, png in pngs.items()
    )
    title = html.escape(f"Benchmark report: {results['task']['name']}")
    activity = by_activity(results)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes(results, activity_notes(activity)))
    by_activity_section = (
        ""
        if activity is None
        else f"<h2>By activity</h2><p>{html.escape(activity_caption(activity, results))}</p>"
        f"{_html_table(*activity_rows(activity, results), partial=_partial(results, activity.means))}"
    )
    needed_headers, needed = users_needed_rows(results)
    needed_section = (
        f"<h2>Users needed</h2><p>{html.escape(users_needed_caption(results))}</p>"
        f"{_html_table(needed_headers, needed)}"
        if needed
        else ""
    )
    timing_headers, timing = timing_rows(results)
    times = "<h2>Time: estimate against actual</h2>" + _html_table(timing_headers, timing) if timing else ""
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{title}</h1>"
        f'<h2>Reading</h2><p class="reading">{html.escape(reading(results))}</p>'
        f"<h2>Methods</h2><p>Sorted by {html.escape(results['primary_metric'])} ({sense(results)}). "
        "Rows marked partial did not finish every test user.</p>"
        f"{_html_table(*method_rows(results), partial=partial)}"
        f"<h2>Against the references</h2><p>One-sided paired bootstrap over the users both methods have; "
        f"delta = method - reference; significant at p &lt; {ALPHA}.</p>"
        f"{_html_table(*comparison_rows(results), partial=partial)}"
        f"{needed_section}"
        f"{by_activity_section}"
        f"<h2>Plots</h2>{figures}{times}"
        f"<h2>Task and configuration</h2>{_html_table(['setting', 'value'], setting_rows(results))}"
        f"<h2>Notes</h2><ul>{items}</ul>"
        "</body></html>\n"
    )
