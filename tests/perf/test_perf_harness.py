"""The harness: figures and checks from known timings, the interleaved timing loop, and per-block peak RSS.
No timing targets are asserted anywhere in tests/perf: the machine is shared and noisy, and the benchmark
reports misses rather than failing."""

from __future__ import annotations

import json

import pytest

from tailorlm.perf.harness import Bench, Check, MachineWatch, PeakRSS, PerfConfig, Section, Timing, rotation


def _section() -> Section:
    return Section(
        "demo",
        "a demo",
        timings=[
            Timing("slow", [3.0, 1.0, 2.0], items=10),  # median 2
            Timing("fast", [0.5, 1.0, 1.0]),  # median 1
        ],
    )


def test_a_timing_reports_its_median_and_rate():
    timing = _section().timing("slow")
    assert timing.median == 2.0
    assert timing.rate == 5.0  # 10 items in a median 2 s
    assert _section().timing("fast").rate is None
    assert timing.to_dict()["min_s"] == 1.0 and timing.to_dict()["max_s"] == 3.0


@pytest.mark.parametrize(
    ("numerator", "denominator", "target", "higher_is_better", "value", "passed"),
    [
        ("slow", "fast", 1.5, True, 2.0, True),  # 2x faster than needed 1.5x
        ("slow", "fast", 2.5, True, 2.0, False),  # 2x short of 2.5x
        ("fast", "slow", 0.6, False, 0.5, True),  # a cost ratio of 0.5 within <= 0.6
        ("fast", "slow", 0.4, False, 0.5, False),
    ],
)
def test_a_ratio_check_from_known_medians(numerator, denominator, target, higher_is_better, value, passed):
    section = _section()
    check = section.ratio("label", numerator, denominator, target, higher_is_better)
    assert check.value == value
    assert check.passed is passed
    assert section.checks == [check]
    record = check.to_dict()
    assert record["direction"] == (">=" if higher_is_better else "<=")
    assert (record["numerator"], record["denominator"], record["passed"]) == (numerator, denominator, passed)


def test_a_check_at_its_target_passes_either_way():
    assert Check("x", 1.5, 1.5).passed and Check("x", 1.5, 1.5, higher_is_better=False).passed
    assert not Check("bytes", 1_000_001, 1_000_000, False, unit="B").passed


def test_a_section_serialises_as_json():
    section = _section()
    section.ratio("label", "slow", "fast", 1.0)
    record = json.loads(json.dumps(section.to_dict()))
    assert [t["name"] for t in record["timings"]] == ["slow", "fast"]
    assert record["tables"] == [] and record["checks"][0]["value"] == 2.0


def test_rounds_rotate_the_contenders():
    assert rotation(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotation(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotation(["a", "b", "c"], 5) == ["c", "a", "b"]


def test_interleaved_warms_up_then_runs_rotated_rounds():
    bench = Bench(PerfConfig(model="tiny", warmup=1, repeats=3))
    calls: list[str] = []
    seconds = bench.interleaved("demo", {name: (lambda name=name: calls.append(name)) for name in "abc"})
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(values) for name, values in seconds.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(s >= 0 for values in seconds.values() for s in values)


def test_peak_rss_sees_what_a_block_allocated_and_freed():
    size = 96 * 2**20
    with PeakRSS() as outer, PeakRSS() as inner:
        block = bytearray(size)
        block[::4096] = b"x" * len(block[::4096])  # touch every page, so it is resident
        del block
    assert inner.increase >= 0.8 * size
    assert inner.end < inner.peak  # freed again before the block ended
    assert outer.peak >= inner.peak  # a nested block's reset does not hide its peak from the outer one
    assert set(outer.to_dict()) >= {"rss_mb_start", "rss_mb_peak", "rss_mb_peak_increase", "rss_method"}


def test_machine_watch_reports_load_and_cpu_use():
    with MachineWatch(threads=1) as machine:
        sum(i * i for i in range(200_000))
    assert len(machine.facts["load_average_1min"]) == 2
    assert machine.facts["section_seconds"] > 0 and machine.facts["cpu_busy"] > 0


def test_a_bench_needs_room_for_a_batch_of_distinct_users():
    with pytest.raises(ValueError, match="at least --users-per-batch"):
        Bench(PerfConfig(model="tiny", resident=4, users_per_batch=8))
