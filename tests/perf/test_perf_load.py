"""Cold loads through the slot manager against raw safetensors reads."""

from __future__ import annotations

from tailorlm.perf import load


def test_cold_loads_are_slot_manager_misses_from_stores_of_both_sizes(bench, small):
    section = load.bench_load(bench)
    names = [t.name for t in section.timings]
    assert names == [f(count) for count in small.stores for f in (load.load_name, load.raw_name)]
    assert all(len(t.seconds) == small.load_samples for t in section.timings)
    assert section.facts["misses"] == (small.warmup + small.load_samples) * len(small.stores)
    assert [c.higher_is_better for c in section.checks] == [False, False, False]
    assert [c.target for c in section.checks] == [3.0, 3.0, 1.25]
    assert 0 < section.facts["store_3_bytes"] < section.facts["store_12_bytes"]
