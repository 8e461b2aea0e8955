"""Continuous batching and multi-kind engines: rows of users of every kind, joining and leaving a running
batch at different steps, each produce what that user's module produces alone."""

from __future__ import annotations

import pytest
import torch

from kind_helpers import ALL_KINDS, PROMPTS, SPECS
from tailorlm.engine.bank import EngineError
from tailorlm.engine.batch import Row
from tailorlm.engine.continuous import DecodeRow, RunningBatch, Sampling
from tailorlm.engine.engine import Engine
from tailorlm.engine.generation import DecodeConfig


def distinct_module(bank, slot: int, seed: int) -> dict[str, torch.Tensor]:
    """Put a non-identity module (initial values plus noise) into ``slot`` of ``bank``; returns it."""
    generator = torch.Generator().manual_seed(seed)
    bank.reset(slot, generator)
    module = {n: t + 0.05 * torch.randn(t.shape, generator=generator) for n, t in bank.read(slot).items()}
    bank.write(slot, module)
    return module


@pytest.fixture
def mixed(make_base):
    """One engine with a bank per kind, two users per kind, and each user's module."""
    engine = Engine(make_base(), [SPECS[k] for k in ALL_KINDS], slots=3)
    modules: dict[int, tuple[str, dict]] = {}
    for index, (kind, bank) in enumerate(zip(ALL_KINDS, engine.banks, strict=True)):
        for local in (1, 2):
            module = distinct_module(bank, local, seed=10 * index + local)
            modules[engine.space.global_slot(index, local)] = (kind, module)
    return engine, modules


def alone(make_base, kind: str, module: dict) -> Engine:
    engine = Engine(make_base(), SPECS[kind], slots=2)
    engine.bank.write(1, module)
    return engine


def ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_global_slots_cover_every_bank_once(mixed):
    engine, modules = mixed
    assert sorted(modules) == list(range(1, engine.space.size))
    assert [engine.space.locate(s) for s in sorted(modules)] == [
        (b, local) for b in range(len(ALL_KINDS)) for local in (1, 2)
    ]
    with pytest.raises(EngineError, match="out of range"):
        engine.check_slot(engine.space.size)


def test_mixed_kind_batch_logits_equal_each_user_alone(mixed, make_base):
    engine, modules = mixed
    slots = [*sorted(modules), 0]
    rows = [
        Row(PROMPTS[i % len(PROMPTS)][0], PROMPTS[i % len(PROMPTS)][1], slot) for i, slot in enumerate(slots)
    ]
    batch = engine.encode(rows)
    with torch.inference_mode():
        together = engine.logits(batch)
    for index, row in enumerate(rows):
        reference = alone(make_base, modules[row.slot][0], modules[row.slot][1]) if row.slot else None
        if reference is None:
            reference = Engine(make_base(), SPECS["lora"], slots=2)
        single = reference.encode([Row(row.prompt, row.target, 1 if row.slot else 0)])
        with torch.inference_mode():
            expected = reference.logits(single)[0]
        width = single.attention_mask.sum()
        got = together[index][batch.attention_mask[index].bool()]
        assert got.shape[0] == width
        torch.testing.assert_close(got, expected[single.attention_mask[0].bool()], atol=2e-5, rtol=1e-4)


def test_rows_of_every_kind_joining_midway_decode_as_alone(mixed, make_base):
    """Rows join a running batch at different steps, with different lengths, and leave when done; each
    row's greedy tokens equal stock generation (transformers' ``generate``) for that user alone."""
    engine, modules = mixed
    slots = sorted(modules)
    prompts = [PROMPTS[i % len(PROMPTS)][0] + f" ({i})" for i in range(len(slots))]
    lengths = [3 + i % 4 for i in range(len(slots))]
    rows = [
        DecodeRow(ids(engine, p), s, Sampling(max_new_tokens=n))
        for p, s, n in zip(prompts, slots, lengths, strict=True)
    ]
    running = RunningBatch(engine)
    running.add(rows[:3])
    waiting = rows[3:]
    widths = []
    while running.rows or waiting:
        if waiting:
            running.add(waiting[:2])  # two newcomers prefilled together while others are mid-decode
            waiting = waiting[2:]
        running.step()
        widths.append(running.columns)
    for row, prompt, slot, length in zip(rows, prompts, slots, lengths, strict=True):
        assert row.finish_reason in ("stop", "length")
        kind, module = modules[slot]
        reference = alone(make_base, kind, module)
        expected = reference.generate([prompt], [1], DecodeConfig(max_new_tokens=length))[0]
        got = engine.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
        assert got == expected, (kind, slot)
    assert running.columns == 0


def test_finished_rows_free_their_columns(make_base):
    engine = Engine(make_base(), SPECS["lora"], slots=3)
    long_row = DecodeRow(ids(engine, "a long prompt " * 8), 1, Sampling(max_new_tokens=1))
    short_row = DecodeRow(ids(engine, "short"), 2, Sampling(max_new_tokens=4))
    running = RunningBatch(engine)
    running.add([long_row, short_row])
    assert long_row.finish_reason == "length" and running.rows == [short_row]
    assert running.columns == len(short_row.prompt_ids)  # the long prompt's columns are gone


def test_seeded_sampling_repeats_whatever_rides_along(make_base):
    engine = Engine(make_base(), SPECS["lora"], slots=3)
    prompt = ids(engine, "Tell me something")
    settings = Sampling(max_new_tokens=6, temperature=1.0, seed=7)

    def sample(companions: int) -> list[int]:
        row = DecodeRow(prompt, 1, settings)
        running = RunningBatch(engine)
        others = [
            DecodeRow(ids(engine, f"other {i}"), 2, Sampling(max_new_tokens=6, temperature=1.0))
            for i in range(companions)
        ]
        running.add([row, *others])
        while running.rows:
            running.step()
        return row.tokens

    first = sample(0)
    assert sample(2) == first
    assert sample(0) == first
    greedy_row = DecodeRow(prompt, 1, Sampling(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=3))
    plain_row = DecodeRow(prompt, 1, Sampling(max_new_tokens=6))
    running = RunningBatch(engine)
    running.add([greedy_row, plain_row])
    while running.rows:
        running.step()
    assert greedy_row.tokens == plain_row.tokens  # a nucleus of one token is greedy


def test_extreme_sampling_settings_are_greedy_not_nan(make_base):
    """The smallest positive temperature and top_p (below float32's resolution) still choose a token: the
    most likely one, as greedy decoding does."""
    engine = Engine(make_base(), SPECS["lora"], slots=3)
    prompt = ids(engine, "Tell me something")
    extreme = [
        Sampling(max_new_tokens=5, temperature=5e-324, seed=1),
        Sampling(max_new_tokens=5, temperature=1.0, top_p=5e-324, seed=2),
        Sampling(max_new_tokens=5, temperature=1e-300, top_p=1e-300, seed=(1 << 64) - 1),
    ]
    rows = [DecodeRow(prompt, 1, settings) for settings in extreme]
    plain = DecodeRow(prompt, 1, Sampling(max_new_tokens=5))
    running = RunningBatch(engine)
    running.add([*rows, plain])
    while running.rows:
        running.step()
    for row in rows:
        assert row.finish_reason in ("stop", "length") and row.tokens == plain.tokens


def test_a_row_that_cannot_sample_fails_alone(make_base):
    engine = Engine(make_base(), SPECS["lora"], slots=3)
    broken = DecodeRow(ids(engine, "first"), 1, Sampling(max_new_tokens=4, temperature=1.0, seed=1))
    broken.generator = "not a generator"  # multinomial raises for this row only
    others = [DecodeRow(ids(engine, f"other {i}"), 2, Sampling(max_new_tokens=4)) for i in range(2)]
    running = RunningBatch(engine)
    produced = running.add([broken, *others])
    assert broken.finish_reason == "error" and isinstance(broken.error, Exception)
    assert (broken, -1) in produced and broken not in running.rows
    while running.rows:
        running.step()
    for row in others:
        alone = DecodeRow(row.prompt_ids, 2, Sampling(max_new_tokens=4))
        single = RunningBatch(engine)
        single.add([alone])
        while single.rows:
            single.step()
        assert row.tokens == alone.tokens


def test_seeds_outside_the_generators_range_are_refused():
    for seed in ((1 << 64), -(1 << 63) - 1):
        with pytest.raises(ValueError, match="seed"):
            Sampling(temperature=1.0, seed=seed)


@pytest.mark.parametrize(
    "settings",
    [{"max_new_tokens": 0}, {"temperature": -1.0}, {"temperature": 3.0}, {"top_p": 0.0}, {"top_p": 1.5}],
)
def test_impossible_settings_are_refused(settings):
    with pytest.raises(ValueError):
        Sampling(**settings)


def test_two_banks_that_insert_positions_mix_rows_as_alone(make_base):
    """Two banks that each put positions before the text (of different counts) in one engine: each row
    runs with its own user's block only, the other bank's masked out, as on an engine of its own kind."""
    from tailorlm.kinds.prompt import PromptSpec

    specs = [PromptSpec(virtual_tokens=3), PromptSpec(virtual_tokens=5)]
    engine = Engine(make_base(), specs, slots=2)
    modules = [distinct_module(bank, 1, seed=7 + i) for i, bank in enumerate(engine.banks)]
    rows = [Row(PROMPTS[i][0], PROMPTS[i][1], engine.space.global_slot(i, 1)) for i in range(2)]
    rows.append(Row(PROMPTS[2][0], PROMPTS[2][1], 0))
    batch = engine.encode(rows)
    with torch.inference_mode():
        together = engine.logits(batch)
    for index, row in enumerate(rows):
        single_engine = Engine(make_base(), specs[min(index, 1)], slots=2)
        if row.slot:
            single_engine.bank.write(1, modules[index])
        single = single_engine.encode([Row(row.prompt, row.target, 1 if row.slot else 0)])
        with torch.inference_mode():
            expected = single_engine.logits(single)[0][single.attention_mask[0].bool()]
        got = together[index][batch.attention_mask[index].bool()]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
