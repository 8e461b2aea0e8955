"""Generation in a mixed batch: the engine and PEFT produce the same text in the same number of steps, and
the bare model is held to that step count."""

from __future__ import annotations

from tailorlm.perf import decode
from tailorlm.perf.contenders import BARE, ENGINE, PEFT_MIXED


def test_decode_runs_every_contender_for_the_same_steps(bench, small):
    section = decode.bench_decode(bench)
    assert decode.decode_kind() == "lora"
    assert [t.name for t in section.timings] == [ENGINE, BARE, PEFT_MIXED]
    assert section.facts["same_text_as_peft"] is True
    assert 1 <= section.facts["decode_steps"] <= small.decode_tokens
    assert [c.target for c in section.checks] == [0.9, 1.5]
    assert all(len(t.seconds) == small.repeats for t in section.timings)
