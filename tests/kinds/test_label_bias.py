"""The label bias: a user's few numbers over a task's labels, added to the shared model's label scores in
a slot like any module, mixed in one batch with other kinds' users, saved and reloaded as a module file."""

from __future__ import annotations

import pytest
import torch

from tailorlm import kinds
from tailorlm.engine.engine import Engine
from tailorlm.kinds import ModuleSpecError
from tailorlm.kinds.label_bias import BIAS, OLD_WEIGHT, WEIGHT, LabelBiasSpec, label_part
from tailorlm.kinds.lora import LoraSpec
from tailorlm.store.store import ModuleStore

LABELS = ("yes", "perhaps", "no")
PROMPTS = ["Do you shout when a bus is late?", "Would you curse at the train?", "Do you scold?"]


def test_a_user_bias_shifts_their_label_scores_by_exactly_their_bias(make_base):
    engine = Engine(make_base(), LabelBiasSpec(LABELS), slots=3)
    bias = torch.tensor([0.5, -1.25, 2.0])
    engine.bank.write(1, label_part(bias))
    bare = torch.tensor(engine.score_labels(PROMPTS, [0, 0, 0], LABELS))
    own = torch.tensor(engine.score_labels(PROMPTS, [1, 1, 0], LABELS))
    torch.testing.assert_close(own[:2], bare[:2] + bias, atol=1e-5, rtol=0)
    torch.testing.assert_close(own[2], bare[2], atol=0, rtol=0)  # slot 0 is the shared model
    # Labels are matched by name: another order, and a label the bias does not know, which gets nothing.
    asked = ("no", "yes", "never")
    shuffled = torch.tensor(engine.score_labels(PROMPTS[:1], [1], asked))
    plain = torch.tensor(engine.score_labels(PROMPTS[:1], [0], asked))
    torch.testing.assert_close(shuffled - plain, torch.tensor([[2.0, 0.5, 0.0]]), atol=1e-5, rtol=0)


def test_bias_users_and_lora_users_mix_in_one_batch_each_as_alone(make_base):
    """A two-kind engine: LoRA users get their LoRA term only, bias users their bias only."""
    engine = Engine(make_base(), [LoraSpec(rank=2), LabelBiasSpec(LABELS)], slots=[3, 3])
    generator = torch.Generator().manual_seed(0)
    lora = engine.banks[0]
    lora.reset(1, generator)
    with torch.no_grad():
        for tensor in lora.tensors.values():
            tensor[1].normal_(0, 0.2, generator=generator)
    bias_slot = engine.space.global_slot(1, 1)
    engine.banks[1].write(1, label_part(torch.tensor([1.0, 0.0, -1.0])))
    mixed = torch.tensor(engine.score_labels(PROMPTS, [1, bias_slot, 0], LABELS))
    alone = [
        torch.tensor(engine.score_labels([p], [s], LABELS))[0]
        for p, s in zip(PROMPTS, [1, bias_slot, 0], strict=True)
    ]
    torch.testing.assert_close(mixed, torch.stack(alone), atol=2e-5, rtol=0)
    bare = torch.tensor(engine.score_labels(PROMPTS[1:2], [0], LABELS))[0]
    torch.testing.assert_close(alone[1], bare + torch.tensor([1.0, 0.0, -1.0]), atol=1e-5, rtol=0)
    assert not torch.allclose(alone[0], torch.tensor(engine.score_labels(PROMPTS[:1], [0], LABELS))[0])


def test_a_users_weight_weighs_the_shared_models_scores(make_base):
    """Scores are ``weight * shared + bias``: weight 0 answers the bias alone (a user's prior), whatever the
    prompt; a weight of 0.4 weighs the shared model's scores by exactly that."""
    engine = Engine(make_base(), LabelBiasSpec(LABELS), slots=3)
    log_prior = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    engine.bank.write(1, label_part(log_prior, weight=0.0))
    engine.bank.write(2, label_part(torch.tensor([0.1, 0.0, -0.1]), weight=0.4))
    bare = torch.tensor(engine.score_labels(PROMPTS, [0, 0, 0], LABELS))
    prior_user = torch.tensor(engine.score_labels(PROMPTS, [1, 1, 1], LABELS))
    torch.testing.assert_close(prior_user, log_prior.expand(3, -1), atol=1e-6, rtol=0)
    weighed = torch.tensor(engine.score_labels(PROMPTS, [2, 2, 2], LABELS))
    torch.testing.assert_close(weighed, 0.4 * bare + torch.tensor([0.1, 0.0, -0.1]), atol=1e-5, rtol=0)


def test_a_bias_changes_no_logit_and_no_generated_text(make_base):
    engine = Engine(make_base(), LabelBiasSpec(LABELS), slots=2)
    engine.bank.write(1, label_part(torch.tensor([5.0, 5.0, -5.0]), weight=0.0))
    assert engine.generate(PROMPTS, [1, 1, 1]) == engine.generate(PROMPTS, [0, 0, 0])


def test_a_stored_bias_reloads_into_a_slot(make_base, tmp_path):
    spec = LabelBiasSpec(LABELS)
    engine = Engine(make_base(), spec, slots=2)
    store = ModuleStore(tmp_path / "store")
    bias = torch.tensor([0.1, 0.2, -0.3])
    store.put("ann", spec, label_part(bias, weight=0.25), model=engine.model, base_name=engine.base.name)
    # A file written before the weight existed holds the bias alone; it loads with weight 1. One written
    # while the weight was called ``label_scale`` loads its weight under the name it has now.
    store.put("old", spec, {BIAS: bias}, model=engine.model, base_name=engine.base.name)
    store.put(
        "older",
        spec,
        {BIAS: bias, OLD_WEIGHT: torch.tensor([0.5])},
        model=engine.model,
        base_name=engine.base.name,
    )
    stored = store.get("ann")
    assert stored.spec == spec and kinds.spec_from_dict(kinds.spec_to_dict(spec)) == spec
    engine.bank.write(1, store.loader(spec)("ann"))
    assert torch.equal(engine.bank.read(1)[BIAS], bias.half().float())  # stored in fp16, as every module
    assert torch.equal(engine.bank.read(1)[WEIGHT], torch.tensor([0.25]))
    engine.bank.write(1, store.loader(spec)("old"))
    assert torch.equal(engine.bank.read(1)[WEIGHT], torch.tensor([1.0]))
    engine.bank.write(1, store.loader(spec)("older"))
    assert torch.equal(engine.bank.read(1)[WEIGHT], torch.tensor([0.5]))
    engine.bank.clear(1)
    assert engine.bank.is_identity(1)


def test_label_bias_specs_are_checked():
    with pytest.raises(ModuleSpecError, match="distinct label strings"):
        kinds.validate(LabelBiasSpec(("yes", "yes")))
    assert not kinds.get("label-bias").acts_on_model and "label-bias" not in kinds.MODEL_KINDS
