"""What the benchmark feeds its contenders: prompts, synthetic and real training rows, resident users."""

from __future__ import annotations

import pytest
import torch

from tailorlm import kinds
from tailorlm.data import load_task
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.perf import workloads
from tailorlm.perf.harness import PerfConfig


def test_prompts_are_distinct_chat_prompts_near_the_asked_length(bench):
    tokenizer = bench.tokenizer
    prompts = workloads.chat_prompts(tokenizer, 96, 8, seed=0)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(prompts)) == 8 and all(p.startswith("<|im_start|>") for p in prompts)
    assert max(lengths) <= 96 + 2 and min(lengths) >= 0.75 * 96 - 2


def test_synthetic_users_are_distinct_and_sized_as_asked(bench):
    users = workloads.training_users(bench.tokenizer, 3, 5, seed=0)
    assert [u.user_id for u in users] == ["user0", "user1", "user2"]
    assert all(len(u.train) == 5 for u in users)
    assert users[0].train != users[1].train
    long_rows = workloads.training_users(bench.tokenizer, 1, 2, seed=0, words=300)[0].train
    assert len(bench.tokenizer(long_rows[0][0])["input_ids"]) > 250


def test_task_users_are_real_rows_prompted_as_the_benchmark_trains(bench):
    users = workloads.task_users(bench.tokenizer, "verbagg", users=3, examples=4, seed=0)
    task = load_task("verbagg", seed=0)
    assert len({u.user_id for u in users}) == 3
    for data in users:
        user = task.user(data.user_id)
        expected = task.training_examples(user)[:4]
        assert [target for _, target in data.train] == [e.target for e in expected]
        assert all(target in task.labels for _, target in data.train)
        assert all(prompt.startswith("<|im_start|>") for prompt, _ in data.train)
    with pytest.raises(ValueError, match="training examples"):
        workloads.task_users(bench.tokenizer, "verbagg", users=3, examples=10_000, seed=0)


def test_random_users_are_placed_through_the_slot_manager(bench):
    engine = Engine(bench.fresh_base(), kinds.default_spec("lora"), slots=6)
    manager = SlotManager(engine.bank)
    users = workloads.place_random_users(manager, 4, seed=0)
    assert manager.resident() == users
    slots = [manager.slot_of(u) for u in users]
    assert sorted(slots) == [1, 2, 3, 4]
    assert not any(engine.bank.is_identity(s) for s in slots) and engine.bank.is_identity(5)
    first, second = (engine.bank.read(s) for s in slots[:2])
    assert any(not torch.equal(first[name], second[name]) for name in first)
    with pytest.raises(ValueError, match="empty bank"):
        workloads.place_random_users(manager, 1, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        workloads.place_random_users(SlotManager(engine.bank), 6, seed=0)


@pytest.mark.parametrize("kind", list(kinds.MODEL_KINDS))
def test_numbers_per_user_match_the_bank_and_cap_the_resident_count(bench, kind):
    spec = kinds.default_spec(kind)
    engine = Engine(bench.fresh_base(), spec, slots=2)
    numbers = workloads.numbers_per_user(bench.bare.model, spec)
    assert numbers == engine.bank.parameter_count()
    tight = PerfConfig(model="tiny", resident=1000, bank_budget_bytes=4 * numbers * 50)
    assert workloads.resident_for(tight, bench.bare.model, spec) == 50


def test_specs_are_described_by_kind_and_what_differs_from_its_default():
    lora = kinds.default_spec("lora")
    assert workloads.describe(lora) == "lora"
    wider = type(lora)(targets=("q_proj", "k_proj"))
    assert workloads.describe(wider) == "lora targets=q_proj,k_proj"
    assert "targets q_proj,v_proj" in workloads.settings_text(lora)


def test_real_tokens_count_every_row_without_padding(bench):
    engine = Engine(bench.fresh_base(), kinds.default_spec("lora"), slots=2)
    users = workloads.training_users(bench.tokenizer, 2, 3, seed=1)
    expected = sum(
        len(bench.tokenizer(p, add_special_tokens=False)["input_ids"])
        + len(bench.tokenizer(t, add_special_tokens=False)["input_ids"])
        + 1  # end of sequence after the target
        for u in users
        for p, t in u.train
    )
    assert workloads.real_tokens(engine, users) == expected
