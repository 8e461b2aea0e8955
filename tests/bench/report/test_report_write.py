"""``write_report``: report.md with its PNG plots and the self-contained report.html, written to the run."""

from __future__ import annotations

from bench_helpers import no_reference_run

from tailorlm.bench import report
from tailorlm.bench.report.plots import PLOTS


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
    assert all(paths[f"plot_{key}"].read_bytes().startswith(b"\x89PNG") for key in PLOTS)


def test_report_without_references_still_has_every_plot(tmp_path):
    # No results given: write_report recomputes them and writes results.json first.
    paths = report.write_report(no_reference_run(tmp_path))
    assert paths["results"].is_file()
    assert paths["html"].read_text().count('<img src="data:image/png;base64,') == 3
