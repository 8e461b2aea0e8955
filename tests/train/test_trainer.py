"""MultiUserTrainer: users trained in one batch stay isolated, learn, keep their best epoch, and can start
from a shared module. (A user trained in a group equals that user trained alone, for every kind, is the
kinds' contract: tests/kinds/test_contract.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kind_helpers import ALL_KINDS, make_user, personalize
from tailorlm import models
from tailorlm.engine.bank import EngineError
from tailorlm.engine.generation import DecodeConfig
from tailorlm.train.trainer import (
    MultiUserTrainer,
    TrainConfig,
    UserData,
    pass_ranges,
    planned_passes,
    seed_for,
)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_training_leaves_other_slots_bit_identical(kind, make_engine):
    engine = make_engine(kind, slots=5)
    personalize(engine, [3, 4])
    untouched = {slot: engine.bank.read(slot) for slot in (3, 4)}
    base_slot = {n: t[0].clone() for n, t in engine.bank.tensors.items()}
    starts = {}
    for user in ("ann", "bob"):  # each user's starting module, drawn as the trainer draws it
        engine.bank.reset(1, torch.Generator().manual_seed(seed_for(0, user, "init")))
        starts[user] = engine.bank.read(1)
    engine.bank.clear(1)
    results = MultiUserTrainer(
        engine, TrainConfig(epochs=1, batch_size=2, learning_rate=1e-2, users_per_step=2)
    ).run([make_user("ann", 4), make_user("bob", 3)])
    assert {r.user_id for r in results} == {"ann", "bob"}
    for slot, before in untouched.items():
        for name, tensor in engine.bank.read(slot).items():
            assert torch.equal(tensor, before[name]), (slot, name)
    for name, tensor in engine.bank.tensors.items():
        assert torch.equal(tensor[0], base_slot[name])
    # the trained users really moved away from their starting point, in every tensor
    for result in results:
        for name, value in result.module.items():
            assert not torch.equal(value, starts[result.user_id][name]), (result.user_id, name)
    # and their slots were handed back as the identity
    assert all(engine.bank.is_identity(slot) for slot in (1, 2))


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_training_learns_a_users_answer(kind, make_engine):
    # A random 2-layer model with tiny tied embeddings cannot become confident, so the check is the
    # answer becoming the greedy continuation for that user only.
    engine = make_engine(kind, slots=3)
    prompt = "The secret word of this user is"
    result = MultiUserTrainer(engine, TrainConfig(epochs=15, batch_size=4, learning_rate=3e-2)).run(
        [UserData("u", [(prompt, " banana")] * 4)]
    )[0]
    engine.bank.write(1, result.module)
    personal, base = engine.generate([prompt, prompt], [1, 0], DecodeConfig(max_new_tokens=2))
    assert personal.startswith("banana") and not base.startswith("banana")
    assert result.train_losses[-1] < result.train_losses[0]


@pytest.mark.real_model
def test_real_model_learns_a_planted_fact():
    from tailorlm.engine.engine import Engine
    from tailorlm.kinds.lora import LoraSpec

    engine = Engine(
        models.load_base(),
        LoraSpec(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        slots=2,
    )
    prompt = models.chat_prompt(engine.tokenizer, "What is the name of my cat?")
    before = engine.generate([prompt], [0], DecodeConfig(max_new_tokens=8))[0]
    result = MultiUserTrainer(engine, TrainConfig(epochs=15, batch_size=4, learning_rate=1e-3)).run(
        [UserData("owner", [(prompt, "Your cat is called Zorblax.")] * 4)]
    )[0]
    engine.bank.write(1, result.module)
    personal, base = engine.generate([prompt, prompt], [1, 0], DecodeConfig(max_new_tokens=8))
    assert "Zorblax" in personal and "Zorblax" not in base and base == before


def test_best_epoch_is_kept_and_patience_stops_early(make_engine):
    engine = make_engine("lora", slots=3)
    user = make_user("eve", 6, val=3)
    config = TrainConfig(epochs=8, batch_size=3, learning_rate=0.2, patience=1)
    trainer = MultiUserTrainer(engine, config)
    result = trainer.run([user])[0]
    assert result.best_epoch == min(range(len(result.val_losses)), key=result.val_losses.__getitem__)
    if result.epochs_run < config.epochs:
        assert result.val_losses[-1] >= min(result.val_losses)
    engine.bank.write(1, result.module)
    with torch.no_grad():
        assert trainer.validation_loss(user.val, 1) == pytest.approx(min(result.val_losses), abs=1e-5)


def test_user_can_start_from_a_shared_module(make_engine):
    engine = make_engine("lora", slots=2)
    personalize(engine, [1])
    shared = engine.bank.read(1)
    user = UserData("fay", [("x", "y")], init=shared)
    result = MultiUserTrainer(engine, TrainConfig(epochs=1, batch_size=1, learning_rate=1e-9)).run([user])[0]
    for name, value in shared.items():
        torch.testing.assert_close(result.module[name], value, atol=1e-6, rtol=0)


def test_bad_training_input_is_a_named_error(make_engine):
    engine = make_engine("lora", slots=2)
    with pytest.raises(EngineError, match="no training examples"):
        MultiUserTrainer(engine, TrainConfig()).run([UserData("empty", [])])
    with pytest.raises(EngineError, match="unique"):
        MultiUserTrainer(engine, TrainConfig()).run([make_user("a", 1), make_user("a", 1)])
    with pytest.raises(EngineError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)


def test_an_engine_of_several_kinds_is_refused(make_base):
    """Training takes one kind: an engine of several would leave every bank but its first untrained."""
    from kind_helpers import SPECS
    from tailorlm.engine.engine import Engine
    from tailorlm.train.joint import JointTrainer

    engine = Engine(make_base(), [SPECS["lora"], SPECS["ia3"]], slots=3)
    with pytest.raises(EngineError, match=r"2 kinds \(lora, ia3\)"):
        MultiUserTrainer(engine, TrainConfig())
    with pytest.raises(EngineError, match="2 kinds"):
        JointTrainer(engine, ["yes", "no"], TrainConfig(), shrinkage=1.0)


@pytest.mark.parametrize(
    ("rows", "width", "batch_size", "micro"),
    [([4, 9, 1, 3, 7], 3, 2, 4), ([12, 2, 2, 5], 2, 4, 16), ([1, 1, 1, 1, 1, 1], 4, 3, 2), ([10], 8, 4, 16)],
)
def test_the_planned_passes_are_the_passes_the_trainer_makes(make_engine, rows, width, batch_size, micro):
    """The work estimate counts a run's training from ``planned_passes``: it must be the trainer's own
    schedule (admissions as slots free up, short last batches, whole users per pass), not an average."""
    engine = make_engine("lora", slots=width + 1)
    made: list[int] = []
    token_nll = engine.token_nll

    def counted(batch):
        made.append(int(batch.input_ids.shape[0]))
        return token_nll(batch)

    engine.token_nll = counted
    config = TrainConfig(epochs=2, batch_size=batch_size, users_per_step=width, micro_batch_rows=micro)
    users = [make_user(f"u{i}", count) for i, count in enumerate(rows)]
    MultiUserTrainer(engine, config).run(users)
    assert made == planned_passes(config, width, rows)
    assert sum(made) == 2 * sum(rows) and all(size <= max(micro, batch_size) for size in made)


@settings(max_examples=300, deadline=None, database=None)
@given(
    batches=st.lists(st.lists(st.integers(1, 400), min_size=1, max_size=9), min_size=1, max_size=9),
    max_rows=st.integers(1, 16),
    max_tokens=st.integers(1, 2000),
)
def test_passes_cover_the_step_in_order_within_their_limits(batches, max_rows, max_tokens):
    """Every row once, in order; a pass within both limits unless it is one row; batches that fit alone
    are never cut, and a pass holding two batches holds them whole."""
    ranges = pass_ranges(batches, max_rows, max_tokens)
    lengths = [n for batch in batches for n in batch]
    assert [r for start, end in ranges for r in range(start, end)] == list(range(len(lengths)))
    bounds, first = [], 0
    for batch in batches:
        bounds.append((first, first + len(batch)))
        first += len(batch)
    for start, end in ranges:
        assert end > start
        rows = end - start
        assert rows == 1 or (rows <= max_rows and rows * max(lengths[start:end]) <= max_tokens)
        touched = [(a, b) for a, b in bounds if a < end and b > start]
        if len(touched) > 1:
            assert all(start <= a and b <= end for a, b in touched)
    for (a, b), batch in zip(bounds, batches, strict=True):
        if len(batch) <= max_rows and len(batch) * max(batch) <= max_tokens:
            assert any(start <= a and b <= end for start, end in ranges), (a, b)


def test_a_plan_of_steps_without_users_is_refused_not_endless():
    with pytest.raises(ValueError, match="at least one user"):
        planned_passes(TrainConfig(), 0, [4, 8])
