"""SlotAdamW and the schedule: each slot is torch's AdamW on that slot alone (own moments, step count,
learning rate and gradient clipping), and the schedule is transformers' linear warm-up and decay."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from kind_helpers import make_user
from tailorlm.engine.engine import Row
from tailorlm.train.optimizer import SlotAdamW, linear_schedule
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, seed_for


def test_engine_optimizer_matches_peft_with_torch_adamw(make_engine, make_base):
    config = TrainConfig(
        epochs=2, batch_size=2, learning_rate=3e-3, warmup_ratio=0.25, weight_decay=0.05, max_grad_norm=0.5
    )
    user = make_user("dana", 5)
    engine = make_engine("lora", slots=2)
    trainer = MultiUserTrainer(engine, config)
    ours = trainer.run([user])[0]

    # The same user with stock PEFT and torch's AdamW, starting from the same initial module.
    init_engine = make_engine("lora", slots=2)
    init_engine.bank.reset(1, torch.Generator().manual_seed(seed_for(config.seed, "dana", "init")))
    start = init_engine.bank.read(1)
    spec = engine.spec
    peft_model = get_peft_model(
        make_base().model,
        LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets)),
    )
    state = {n.replace(".weight", ".default.weight"): v for n, v in start.items()}
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


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_each_slot_is_torch_adamw_on_that_slot_alone(max_grad_norm):
    """Slots 1 and 3 step with their own learning rates and clipping, slot 2 joins later (its own step
    count and bias correction), slot 0 never steps; each is checked against a torch AdamW of its own."""
    config = TrainConfig(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=max_grad_norm)
    generator = torch.Generator().manual_seed(0)
    shapes = {"a": (4, 3, 5), "b": (4, 7)}
    tensors = {n: torch.nn.Parameter(torch.randn(s, generator=generator)) for n, s in shapes.items()}
    ours = SlotAdamW(tensors, config)
    theirs = {}
    for slot in range(4):
        params = [torch.nn.Parameter(tensors[n].detach()[slot].clone()) for n in shapes]
        adamw = torch.optim.AdamW(
            params, lr=1.0, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
        theirs[slot] = (params, adamw)
    rates = {1: 1e-2, 2: 3e-2, 3: 5e-3}
    plan = [[1, 3], [1, 3], [1, 2, 3], [2, 3], [1, 2, 3]]
    for step_slots in plan:
        grads = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
        for name, tensor in tensors.items():
            tensor.grad = grads[name].clone()
        slots = torch.tensor(step_slots)
        ours.step(slots, torch.tensor([rates[s] for s in step_slots]))
        for slot in step_slots:
            params, adamw = theirs[slot]
            for param, name in zip(params, shapes, strict=True):
                param.grad = grads[name][slot].clone()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            for group in adamw.param_groups:
                group["lr"] = rates[slot]
            adamw.step()
    for slot, (params, _) in theirs.items():
        for param, name in zip(params, shapes, strict=True):
            torch.testing.assert_close(tensors[name].detach()[slot], param.detach(), atol=1e-6, rtol=1e-5)
    assert ours.steps.tolist() == [0, 4, 3, 5]
    ours.reset(1)
    assert ours.steps[1] == 0 and not ours.exp_avg["a"][1].any() and not ours.exp_avg_sq["b"][1].any()


@pytest.mark.parametrize(("total", "warmup"), [(10, 0), (10, 3), (7, 7), (1, 0)])
def test_linear_schedule_is_transformers_linear_warmup(total, warmup):
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    for step in range(total + 2):
        assert linear_schedule(step, total, warmup) == pytest.approx(scheduler.lr_lambdas[0](step))
