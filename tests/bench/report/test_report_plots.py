"""The report's figures: PNG bytes for every plot, the same bytes for the same results."""

from __future__ import annotations

import pytest
from bench_helpers import CLASSIFICATION, METHODS, write_run

from tailorlm.bench.report.plots import PLOTS
from tailorlm.bench.results import summarize


@pytest.mark.parametrize("key", PLOTS)
def test_plot_is_a_png_and_the_same_each_time(planted, key):
    _, results = planted
    draw = PLOTS[key][1]
    png = draw(results)
    assert png.startswith(b"\x89PNG") and draw(results) == png


@pytest.mark.parametrize("key", PLOTS)
def test_plot_without_any_results_is_still_drawn(tmp_path, key):
    root = write_run(
        tmp_path, CLASSIFICATION, {"zero-shot": METHODS["zero-shot"]}, {"u1": {"history": 1}}, {}
    )
    assert PLOTS[key][1](summarize(root)).startswith(b"\x89PNG")
