"""``write_report``: report.md with its PNG plots and the self-contained report.html, written to the run."""

from __future__ import annotations

import json

from bench_helpers import CLASSIFICATION, METHODS, line, no_reference_run, write_run

from tailorlm.bench import report
from tailorlm.bench.report.plots import PLOTS


def test_report_html_is_self_contained(planted):
    root, results = planted
    paths = report.write_report(root, results)
    page = paths["html"].read_text()
    assert page.count('<img src="data:image/png;base64,') == len(PLOTS)
    for asset in ('src="http', "src='http", 'href="http', "<script", "<link", "url("):
        assert asset not in page
    assert "partial" in page and "peft-lora" in page
    markdown = paths["markdown"].read_text()
    assert "## Reading" in markdown and "oppu (partial)" in markdown
    # Both renderings size the test against the non-personal reference.
    assert "## Users needed" in markdown and "<h2>Users needed</h2>" in page
    assert all(paths[f"plot_{key}"].read_bytes().startswith(b"\x89PNG") for key in PLOTS)


def test_report_without_references_still_has_every_plot(tmp_path):
    # No results given: write_report recomputes them and writes results.json first.
    paths = report.write_report(no_reference_run(tmp_path))
    assert paths["results"].is_file()
    assert paths["html"].read_text().count('<img src="data:image/png;base64,') == len(PLOTS)
    assert "Users needed" not in paths["markdown"].read_text()  # nothing to size without a reference


def test_a_failed_method_is_named_with_its_reason_and_the_rest_is_reported(tmp_path):
    users = {"u1": {"history": 1}, "u2": {"history": 2}}
    lines: dict[str, list[dict | str]] = {
        "user-majority": [line("u1", ["yes"], ["yes"]), line("u2", ["no"], ["yes"])],
        "peft-lora": [line("u1", ["yes"], ["yes"]), "{cut"],
    }
    methods = {"user-majority": METHODS["user-majority"], "peft-lora": METHODS["peft-lora"]}
    root = write_run(tmp_path, CLASSIFICATION, methods, users, lines)
    (root / "failures.json").write_text(json.dumps({"few-shot": {"reason": "never listed"}}))
    paths = report.write_report(root)
    markdown = paths["markdown"].read_text()
    assert "peft-lora (failed)" in markdown and "peft-lora.jsonl, line 2: not valid JSON" in markdown
    assert "Failed: peft-lora" in markdown and "user-majority" in markdown
    assert "never listed" not in markdown  # only the run's methods are reported
    assert "peft-lora (failed)" in paths["html"].read_text()
