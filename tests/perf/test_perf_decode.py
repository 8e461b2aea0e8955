"""Generation in a mixed batch: the engine and PEFT produce the same text in the same number of steps, and
the bare model is held to that step count."""

from __future__ import annotations

from tailorlm.perf import decode
from tailorlm.perf.contenders import BARE, ENGINE, PEFT_MIXED
from tailorlm.perf.harness import Bench


def test_decode_runs_every_contender_for_the_same_steps(bench, small):
    section = decode.bench_decode(bench)
    assert decode.decode_kind() == "lora"
    assert [t.name for t in section.timings] == [ENGINE, BARE, PEFT_MIXED]
    assert section.facts["same_text_as_peft"] is True
    assert 1 <= section.facts["decode_steps"] <= small.decode_tokens
    assert [c.target for c in section.checks] == [0.9, 1.5]
    assert all(len(t.seconds) == small.repeats for t in section.timings)


def test_one_client_decodes_in_every_dtype_and_int8_for_exactly_the_asked_steps(small):
    bench = Bench(small, dtypes=("fp32", "bf16"))
    section = decode.bench_decode_single(bench)
    variants = ["fp32", "bf16", decode.INT8]
    assert [t.name for t in section.timings] == [
        f"{who}, {variant}" for variant in variants for who in ("engine, 1 user", "bare base model")
    ]
    assert all(t.items == small.decode_tokens and len(t.seconds) == small.repeats for t in section.timings)
    (table,) = section.tables
    assert [row[0] for row in table.rows] == variants and table.rows[0][1:] == ["1.00x", "1.00x"]
    same = section.facts["same_tokens_as_fp32"]
    assert set(same) == set(variants) and same["fp32"] is True
