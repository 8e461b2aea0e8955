"""Many users trained in one batch: isolation, equivalence to training alone, exact optimizer, resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import personalize
from peft import LoraConfig, get_peft_model

from tailorlm import models
from tailorlm.engine.bank import EngineError
from tailorlm.engine.engine import Row
from tailorlm.engine.generation import DecodeConfig
from tailorlm.store import module_folder
from tailorlm.store.store import ModuleStore
from tailorlm.train.jobs import train_job
from tailorlm.train.optimizer import linear_schedule
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, UserData, seed_for


class JobKilled(Exception):
    pass


def _user(name: str, size: int, val: int = 0) -> UserData:
    pairs = [
        (f"{name} says item {i}: is it good?", "yes" if (i + len(name)) % 2 else "no")
        for i in range(size + val)
    ]
    return UserData(name, pairs[:size], pairs[size:])


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt", "bottleneck"])
def test_training_leaves_other_slots_bit_identical(kind, make_engine):
    engine = make_engine(kind, slots=5)
    personalize(engine, [3, 4])
    untouched = {slot: engine.bank.read(slot) for slot in (3, 4)}
    base_slot = {n: t[0].clone() for n, t in engine.bank.tensors.items()}
    results = MultiUserTrainer(
        engine, TrainConfig(epochs=1, batch_size=2, learning_rate=1e-2, users_per_step=2)
    ).run([_user("ann", 4), _user("bob", 3)])
    assert {r.user_id for r in results} == {"ann", "bob"}
    for slot, before in untouched.items():
        for name, tensor in engine.bank.read(slot).items():
            assert torch.equal(tensor, before[name]), (slot, name)
    for name, tensor in engine.bank.tensors.items():
        assert torch.equal(tensor[0], base_slot[name])
    # and the trained users really moved away from their starting point
    assert any(
        (v != 0).any() for r in results for n, v in r.module.items() if "lora_B" in n or "adapter_up" in n
    ) or kind in {"ia3", "prompt"}


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt", "bottleneck"])
def test_users_trained_together_equal_users_trained_alone(kind, make_engine):
    users = [_user("ann", 5, val=2), _user("bob", 3, val=2), _user("cy", 7, val=1)]
    config = TrainConfig(epochs=2, batch_size=2, learning_rate=5e-3, warmup_ratio=0.2, weight_decay=0.01)
    chunked = dataclasses.replace(config, micro_batch_rows=3)  # several forward/backward passes per step
    together = {r.user_id: r for r in MultiUserTrainer(make_engine(kind, slots=4), chunked).run(users)}
    alone_engine = make_engine(kind, slots=2)
    for user in users:
        alone = MultiUserTrainer(alone_engine, config).run([user])[0]
        mixed = together[user.user_id]
        assert alone.steps == mixed.steps
        for name, value in alone.module.items():
            torch.testing.assert_close(mixed.module[name], value, atol=2e-5, rtol=1e-4)
        assert mixed.val_losses == pytest.approx(alone.val_losses, abs=1e-5)


def test_engine_optimizer_matches_peft_with_torch_adamw(make_engine, tokenizer):
    config = TrainConfig(
        epochs=2, batch_size=2, learning_rate=3e-3, warmup_ratio=0.25, weight_decay=0.05, max_grad_norm=0.5
    )
    user = _user("dana", 5)
    engine = make_engine("lora", slots=2)
    trainer = MultiUserTrainer(engine, config)
    ours = trainer.run([user])[0]

    # The same user with stock PEFT and torch's AdamW, starting from the same initial module.
    init_engine = make_engine("lora", slots=2)
    init_engine.bank.reset(1, torch.Generator().manual_seed(seed_for(config.seed, "dana", "init")))
    start = init_engine.bank.read(1)
    spec = engine.spec
    peft_model = get_peft_model(
        models.tiny_model(seed=0, tokenizer=tokenizer).model,
        LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets)),
    )
    state = {
        n.replace("base_model.model.", "base_model.model.", 1).replace(".weight", ".default.weight"): v
        for n, v in start.items()
    }
    peft_model.load_state_dict(state, strict=False)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    total = ours.steps
    warmup = int(-(-total * config.warmup_ratio // 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total, warmup))
    peft_model.train()
    for _, indices, _ in trainer.batch_plan(user):
        batch = engine.encode([Row(*user.train[i], slot=0) for i in indices])
        positions = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
        loss = peft_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=positions,
            labels=batch.labels,
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    trained = {
        n.replace(".default.weight", ".weight"): p.detach()
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }
    assert set(trained) == set(ours.module)
    for name, value in trained.items():
        torch.testing.assert_close(ours.module[name], value, atol=1e-5, rtol=1e-4)


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
    user = _user("eve", 6, val=3)
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
        MultiUserTrainer(engine, TrainConfig()).run([_user("a", 1), _user("a", 1)])
    with pytest.raises(EngineError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)


def test_killed_job_resumes_without_retraining_finished_users(make_engine, tmp_path, monkeypatch):
    users = [_user(name, 3) for name in ("u1", "u2", "u3", "u4")]
    config = TrainConfig(epochs=1, batch_size=2, learning_rate=1e-2, users_per_step=2)
    real_write = module_folder.write_module
    written: list[str] = []
    kills_left = [1]

    def write_then_die(module, folder, **kwargs):
        real_write(module, folder, **kwargs)
        written.append(module.meta["user"])
        if kills_left[0]:
            kills_left[0] -= 1
            raise JobKilled  # the job dies right after its first user was saved

    monkeypatch.setattr(module_folder, "write_module", write_then_die)
    store = ModuleStore(tmp_path)
    with pytest.raises(JobKilled):
        train_job(make_engine("lora", slots=3), users, config, store)
    first = written[0]
    first_file = store.folder(first) / module_folder.WEIGHTS_FILE
    stamp = first_file.stat().st_mtime_ns
    assert sum(store.has(u.user_id) for u in users) == 1

    written.clear()
    trained = train_job(make_engine("lora", slots=3), users, config, store)
    assert sorted(written) == sorted(u.user_id for u in users if u.user_id != first)
    assert sorted(trained) == sorted(written)
    assert first_file.stat().st_mtime_ns == stamp
    assert all(store.has(u.user_id) for u in users)
    assert sorted(store.users()) == sorted(u.user_id for u in users)
