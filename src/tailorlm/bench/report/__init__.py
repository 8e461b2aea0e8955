"""The benchmark report: ``report.md`` with its plots as PNG files, and a self-contained ``report.html``.

Everything shown is read from the results ``tailorlm.bench.results.summarize`` computes. One module per
role: ``tables`` (rows and cell formatting shared by every rendering), ``activity`` (the methods by the
user's number of training items), ``reading`` (the prose paragraph),
``plots`` (the figures), ``markdown`` and ``html_page`` (the two renderings). The end-of-run console table
is console output and lives with the command line, in ``tailorlm.cli.report_table``.
"""

from __future__ import annotations

from pathlib import Path

from tailorlm.bench.report.html_page import render_html
from tailorlm.bench.report.markdown import render_markdown
from tailorlm.bench.report.plots import PLOTS
from tailorlm.bench.report.tables import Results
from tailorlm.bench.results import RESULTS_FILE, write_results

__all__ = ["HTML_FILE", "MARKDOWN_FILE", "PLOTS_DIR", "write_report"]

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
PLOTS_DIR = "plots"


def write_report(run_dir: str | Path, results: Results | None = None) -> dict[str, Path]:
    """Write ``report.md`` (with its plots as PNG files) and the self-contained ``report.html``.

    Without ``results`` they are recomputed from the folder and ``results.json`` is rewritten first.
    Returns the written paths by name: results (when recomputed), markdown, html and one per plot
    (``plot_<key>`` for each key of ``PLOTS``).
    """
    run_dir = Path(run_dir)
    written: dict[str, Path] = {}
    if results is None:
        results = write_results(run_dir)
        written["results"] = run_dir / RESULTS_FILE
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
