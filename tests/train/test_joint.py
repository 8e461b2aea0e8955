"""The joint trainer of a shared module and a bias per user (``train.joint``): its label scores keep their
graph and reach only the trained slot, one step equals the same step written out with torch's AdamW, and
the biases take up each user's leaning (values, not shapes)."""

from __future__ import annotations

import math

import pytest
import torch

from tailorlm.engine.bank import EngineError
from tailorlm.train.joint import JointTrainer, LabelExample, fit_bias
from tailorlm.train.trainer import TrainConfig, seed_for

LABELS = ["yes", "no", "maybe"]
PROMPTS = ["Is the sky green?", "Do cats bark loudly at night?", "Is water wet?", "Can fish fly far?"]


def test_choice_scores_equal_score_choices_and_reach_only_their_slot(make_engine):
    engine = make_engine("lora", slots=4)
    for slot in (1, 2):
        engine.bank.reset(slot, torch.Generator().manual_seed(slot))
    slots = [1, 2, 0, 1]
    expected = torch.tensor(engine.score_labels(PROMPTS, slots, LABELS))
    with engine.training():  # the default LoRA has no dropout, so training scores equal answering ones
        scores = engine.label_scores(PROMPTS[:1], [1], LABELS)
        scores.logsumexp(-1).sum().backward()
    torch.testing.assert_close(scores.detach(), expected[:1], rtol=1e-4, atol=1e-4)
    grads = {name: tensor.grad for name, tensor in engine.bank.tensors.items()}
    assert any(g is not None and g[1].abs().sum() > 0 for g in grads.values())
    for grad in grads.values():
        if grad is not None:
            assert torch.count_nonzero(grad[[0, 2, 3]]) == 0
    # The batched call and the one-batch tensor give the same numbers, row by row.
    again = torch.stack(
        [engine.label_scores([p], [s], LABELS).detach() for p, s in zip(PROMPTS, slots, strict=True)]
    )
    torch.testing.assert_close(again[:, 0], expected, rtol=1e-4, atol=1e-4)


def _examples(labels: dict[str, int]) -> list[LabelExample]:
    """Every prompt once per user, each user always answering their own label."""
    return [LabelExample(user, prompt, label) for user, label in labels.items() for prompt in PROMPTS]


def test_one_step_equals_the_step_written_out_with_torch_adamw(make_engine):
    """The first step (no example seen yet, so every bias is 0) is AdamW on the batch's mean label
    cross-entropy, starting from the module the trainer draws for its id."""
    config = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2, max_grad_norm=None, micro_batch_rows=6)
    train = _examples({"ann": 0, "bob": 1})
    trained = JointTrainer(make_engine("lora", slots=2), LABELS, config, shrinkage=1.0)
    result = trained.run("shared", train)

    engine = make_engine("lora", slots=2)
    engine.bank.reset(1, torch.Generator().manual_seed(seed_for(config.seed, "shared", "init")))
    params = {name: torch.nn.Parameter(tensor[1].clone()) for name, tensor in engine.bank.tensors.items()}
    reference = torch.optim.AdamW(params.values(), lr=config.learning_rate, weight_decay=0.0)
    with engine.training():
        scores = engine.label_scores([e.prompt for e in train], [1] * len(train), LABELS)
        loss = torch.nn.functional.cross_entropy(scores, torch.tensor([e.label for e in train]))
        loss.backward()
    for name, tensor in engine.bank.tensors.items():
        params[name].grad = tensor.grad[1].clone()
    reference.step()
    assert result.steps == 1
    for name, value in result.module.items():
        torch.testing.assert_close(value, params[name].detach(), rtol=1e-5, atol=1e-6)


def test_biases_take_up_each_users_leaning_and_runs_repeat(make_engine):
    """Same prompts, opposite answers: the shared module cannot tell ann from bob, so their biases do;
    the kept biases are the exact fits to the scores the trainer last saw."""
    config = TrainConfig(epochs=3, batch_size=4, learning_rate=1e-2, seed=3)
    train = _examples({"ann": 0, "bob": 1, "cid": 0})
    val = [LabelExample("ann", PROMPTS[0], 0), LabelExample("bob", PROMPTS[1], 1)]
    results = [
        JointTrainer(make_engine("lora", slots=2), LABELS, config, shrinkage=0.5).run("shared", train, val)
        for _ in range(2)
    ]
    first, second = results
    for user, label, other in (("ann", 0, 1), ("bob", 1, 0), ("cid", 0, 1)):
        assert first.biases[user][label] > first.biases[user][other] + 0.5, (user, first.biases[user])
    assert len(first.val_losses) == 3 and first.best_epoch == min(range(3), key=first.val_losses.__getitem__)
    assert all(math.isfinite(loss) for loss in first.train_losses)
    for name, value in first.module.items():
        assert torch.equal(value, second.module[name]), name
    for user, bias in first.biases.items():
        assert torch.equal(bias, second.biases[user])


def test_a_bias_with_no_shrinkage_on_a_flat_model_is_the_users_label_frequencies():
    flat = torch.zeros(4, 2)
    bias = fit_bias(flat, [0, 0, 0, 1], shrinkage=1e-9)
    torch.testing.assert_close(torch.softmax(bias, 0), torch.tensor([0.75, 0.25]), atol=1e-4, rtol=0)


def test_the_fitted_bias_is_the_penalised_optimum():
    """Stationarity of the convex objective: the summed residuals plus shrinkage times the bias is 0."""
    generator = torch.Generator().manual_seed(0)
    model = torch.log_softmax(torch.randn(7, 3, generator=generator), dim=-1)
    targets = [0, 2, 2, 1, 2, 0, 2]
    for shrinkage in (0.5, 3.0):
        bias = fit_bias(model, targets, shrinkage)
        residual = torch.softmax(model + bias, -1) - torch.eye(3)[targets]
        gradient = residual.sum(0) + shrinkage * bias
        assert gradient.abs().max() < 1e-4, (shrinkage, gradient)
    # More shrinkage, a smaller bias; without examples or with overwhelming shrinkage, none at all.
    small, large = (fit_bias(model, targets, s).norm() for s in (100.0, 0.5))
    assert small < large
    assert fit_bias(model, targets, 1e9).abs().max() < 1e-6
    assert torch.equal(fit_bias(model[:0], [], 1.0), torch.zeros(3))


def test_no_penalty_limit_and_infinite_shrinkage():
    scores = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0]] * 4), dim=-1)
    assert torch.equal(fit_bias(scores, [0, 0, 1, 0], math.inf), torch.zeros(3))
    assert torch.equal(fit_bias(scores, [], 1.0), torch.zeros(3))


def test_bad_examples_are_refused(make_engine):
    trainer = JointTrainer(make_engine("lora", slots=2), LABELS, TrainConfig(epochs=1), shrinkage=1.0)
    with pytest.raises(EngineError, match="at least one labelled example"):
        trainer.run("shared", [])
    with pytest.raises(EngineError, match="label index 3 of user 'ann' is not one of the labels"):
        trainer.run("shared", [LabelExample("ann", "q", 3)])
    with pytest.raises(EngineError, match="shrinkage must be >= 0"):
        JointTrainer(make_engine("lora", slots=2), LABELS, TrainConfig(epochs=1), shrinkage=-1.0)
