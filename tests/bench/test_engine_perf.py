"""The engine benchmark's structure and the sanity of its figures on the tiny model. No timing targets are
asserted: the machine is shared and noisy, and the benchmark reports misses rather than failing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tailorlm.bench import engine_perf
from tailorlm.bench.engine_perf import Bench, PerfConfig
from tailorlm.cli import app
from tailorlm.engine.engine import Engine

SMALL = PerfConfig(
    model="tiny",
    resident=20,
    users_per_batch=4,
    repeats=1,
    tokens=48,
    decode_tokens=4,
    train_examples=4,
    train_batch=2,
    train_repeats=1,
    load_samples=3,
    stores=(3, 12),
)


@pytest.fixture(scope="module")
def bench() -> Bench:
    return Bench(SMALL)


def _assert_sane(section: engine_perf.Section) -> None:
    for timing in section.timings:
        assert timing.seconds and all(s > 0 for s in timing.seconds)
        assert min(timing.seconds) <= timing.median <= max(timing.seconds)
    for check in section.checks:
        if check.numerator is not None:
            expected = section.timing(check.numerator).median / section.timing(check.denominator).median
            assert check.value == pytest.approx(expected)
        assert check.passed == (
            check.value >= check.target if check.higher_is_better else check.value <= check.target
        )
    json.dumps(section.to_dict())  # the --json payload must serialise as-is


def test_lora_mixed_batch_has_three_contenders_that_agree(bench):
    section = engine_perf.bench_mixed(bench, "lora")
    _assert_sane(section)
    names = [t.name for t in section.timings]
    assert names == [engine_perf.ENGINE, engine_perf.BARE, engine_perf.PEFT_MIXED]
    assert section.timing(engine_perf.ENGINE).resident == SMALL.resident
    assert section.timing(engine_perf.PEFT_MIXED).resident == SMALL.users_per_batch
    assert [c.target for c in section.checks] == [0.9, 1.5]
    assert len(set(section.facts["users"])) == SMALL.users_per_batch
    assert section.facts["max_abs_logit_diff_vs_peft"] < 1e-3  # same modules, same rows, same answers
    assert section.facts["width"] <= SMALL.tokens + 2


def test_decode_generates_the_same_tokens_as_peft(bench):
    section = engine_perf.bench_decode(bench)
    _assert_sane(section)
    assert [t.name for t in section.timings] == [engine_perf.ENGINE, engine_perf.BARE, engine_perf.PEFT_MIXED]
    assert section.facts["same_tokens_as_peft"] is True
    assert [c.target for c in section.checks] == [0.9, 1.5]


@pytest.mark.parametrize("kind", ["ia3", "prompt", "bottleneck"])
def test_other_kinds_compare_with_the_bare_base(bench, kind):
    section = engine_perf.bench_mixed(bench, kind)
    _assert_sane(section)
    assert [t.name for t in section.timings] == [engine_perf.ENGINE, engine_perf.BARE]
    assert [c.target for c in section.checks] == [0.85]


def test_training_reports_examples_per_second_for_both(bench):
    section = engine_perf.bench_train(bench)
    _assert_sane(section)
    examples = SMALL.users_per_batch * SMALL.train_examples
    for timing in section.timings:
        assert timing.items == examples
        assert timing.rate == pytest.approx(examples / timing.median)
    assert section.facts["steps_peft"] == SMALL.users_per_batch * section.facts["steps_engine"]
    facts = section.facts
    assert facts["real_tokens"] <= facts["padded_positions_peft"] <= facts["padded_positions_engine"]
    assert math.isfinite(section.facts["mean_loss_engine"]) and math.isfinite(section.facts["mean_loss_peft"])


def test_cold_load_compares_stores_of_both_sizes(bench):
    section = engine_perf.bench_load(bench)
    _assert_sane(section)
    assert len(section.timings) == 4 and all(len(t.seconds) == SMALL.load_samples for t in section.timings)
    assert [c.higher_is_better for c in section.checks] == [False, False, False]
    small, large = section.facts["store_3_bytes"], section.facts["store_12_bytes"]
    assert 0 < small < large


def test_bytes_per_user_equal_the_files_on_disk(bench, tmp_path):
    section = engine_perf.bench_bytes(bench, tmp_path)
    rows = {row["module"]: row for row in section.facts["modules"]}
    assert list(rows) == list(engine_perf.AT_REST_SPECS)
    for row in rows.values():
        for dtype in ("fp16", "fp32"):
            files = [f for f in Path(row[f"folder_{dtype}"]).iterdir() if f.is_file()]
            assert row[f"bytes_{dtype}"] == sum(f.stat().st_size for f in files)
        assert row["weights_bytes_fp16"] < row["bytes_fp16"] < row["bytes_fp32"]
        assert row["weights_bytes_fp16"] >= 2 * row["numbers"]
    (check,) = section.checks
    assert check.value == rows["LoRA r8 q,v"]["bytes_fp16"] and check.unit == "B"


@pytest.mark.parametrize("kind", list(engine_perf.MIXED_SPECS))
def test_numbers_per_user_match_the_bank_and_cap_the_resident_count(bench, kind):
    spec = engine_perf.MIXED_SPECS[kind]
    engine = Engine(bench.fresh_base(), spec, slots=2)
    numbers = engine_perf.numbers_per_user(bench.bare.model, spec)
    assert numbers == engine.bank.parameter_count()
    tight = Bench(PerfConfig(model="tiny", resident=1000, bank_budget_bytes=4 * numbers * 50))
    assert tight.resident_for(bench.bare.model, spec) == 50


def test_prompts_are_distinct_chat_prompts_near_the_asked_length(bench):
    tokenizer = bench.bare.tokenizer
    prompts = engine_perf.chat_prompts(tokenizer, 96, 8, seed=0)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(prompts)) == 8 and all(p.startswith("<|im_start|>") for p in prompts)
    assert max(lengths) <= 96 + 2 and min(lengths) >= 0.75 * 96 - 2
    assert engine_perf.position_ids(torch.tensor([[0, 0, 1, 1]])).tolist() == [[0, 0, 0, 1]]


def test_sections_are_parsed_in_benchmark_order():
    assert engine_perf.parse_sections(None) == list(engine_perf.SECTIONS)
    assert engine_perf.parse_sections(["bytes,lora", "train"]) == ["lora", "train", "bytes"]
    with pytest.raises(ValueError, match="unknown section"):
        engine_perf.parse_sections(["speed"])
    with pytest.raises(ValueError, match="at least --users-per-batch"):
        Bench(PerfConfig(model="tiny", resident=4, users_per_batch=8))


def test_cli_prints_one_json_object_with_the_figures():
    arguments = ["perf", "engine", "--model", "tiny", "--json", "--resident", "12", "--repeats", "1"]
    result = CliRunner().invoke(app, [*arguments, "--tokens", "40", "--only", "lora,bytes"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [s["name"] for s in payload["sections"]] == ["lora", "bytes"]
    assert payload["passed"] + payload["missed"] == 3
    assert payload["threads"] >= 1 and payload["config"]["resident"] == 12
    lora = payload["sections"][0]
    medians = {t["name"]: t["median_s"] for t in lora["timings"]}
    for check in lora["checks"]:
        assert check["value"] == pytest.approx(medians[check["numerator"]] / medians[check["denominator"]])


def test_cli_names_a_wrong_section():
    result = CliRunner().invoke(app, ["perf", "engine", "--model", "tiny", "--only", "nope"])
    assert result.exit_code == 2
    assert "unknown section" in result.output
