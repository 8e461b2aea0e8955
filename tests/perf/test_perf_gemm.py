"""The matmul peak at the base model's projection shapes."""

from __future__ import annotations

from tailorlm.perf import gemm
from tailorlm.perf.harness import Bench


def test_shapes_are_the_decoder_projections(bench):
    # The tiny llama: 2 layers, hidden 64, 4 heads of 16 (2 for keys and values), feed-forward 128.
    shapes = gemm.projection_shapes(bench.bare.model)
    assert shapes == {(64, 64): 4, (64, 32): 4, (64, 128): 4, (128, 64): 2}
    found = gemm.gemms(bench.bare.model, (16,))
    assert len(found) == 2 * len(shapes)
    backward = next(g for g in found if g.direction == "backward" and (g.inner, g.cols) == (128, 64))
    assert backward.flop == 2 * 16 * 128 * 64 and backward.count == 4  # grad [16, 128] @ W [128, 64]


def test_calls_are_scaled_to_last_the_asked_time():
    assert gemm.calls_lasting(lambda: None, 0.001) > 1000


def test_the_section_reports_a_peak_the_training_sections_reuse(small):
    bench = Bench(small)
    section = gemm.bench_gemm(bench)
    shapes, mix = section.tables
    assert len(shapes.rows) == len(small.gemm_rows) * 8 and [row[0] for row in mix.rows] == list(
        small.gemm_rows
    )
    best = max(row[2] for row in shapes.rows)
    assert section.facts[gemm.PEAK_KEY] == best > 0
    assert gemm.peak(bench) == (best, section.facts["peak_shape"], "fp32")  # reused, not measured again


def test_the_peak_is_measured_when_no_gemm_section_ran(small):
    bench = Bench(small)
    value, shape, dtype = gemm.peak(bench)
    assert value > 0 and "@" in shape and dtype == "fp32"


def test_every_dtype_of_the_run_has_its_peak_and_the_best_is_the_runs_peak(small):
    bench = Bench(small, dtypes=("fp32", "bf16"))
    section = gemm.bench_gemm(bench)
    assert [t.title.split()[0] for t in section.tables] == ["fp32", "fp32", "bf16", "bf16"]
    peaks = section.facts["peaks_gflops"]
    assert set(peaks) == {"fp32", "bf16"} and min(peaks.values()) > 0
    for name, table in (("fp32", section.tables[0]), ("bf16", section.tables[2])):
        assert peaks[name] == max(row[2] for row in table.rows)
    best = max(peaks, key=peaks.__getitem__)
    assert section.facts["peak_dtype"] == best and gemm.peak(bench)[::2] == (peaks[best], best)
