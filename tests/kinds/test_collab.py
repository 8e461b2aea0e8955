"""The collab kind: its tokens are the MLP they claim to be, a collab user's row is a prompt-tuning row
with those tokens, a user's part is their vector alone (at most 1 KB), and the shared part is checked
before it is written."""

from __future__ import annotations

import pytest
import torch

from kind_helpers import PROMPTS
from tailorlm import kinds
from tailorlm.engine.bank import EngineError
from tailorlm.engine.batch import Row
from tailorlm.engine.engine import Engine
from tailorlm.kinds import ModuleSpecError
from tailorlm.kinds.collab import IN_BIAS, IN_WEIGHT, OUT_BIAS, OUT_WEIGHT, VECTOR, CollabSpec
from tailorlm.kinds.prompt import EMBEDDINGS, PromptSpec

SPEC = CollabSpec(factors=5, tokens=3, width=7)


def trained_looking(engine: Engine, seed: int = 0) -> None:
    """Shared weights and user vectors away from their starting values."""
    generator = torch.Generator().manual_seed(seed)
    engine.bank.write_shared(
        {n: t + 0.1 * torch.randn(t.shape, generator=generator) for n, t in engine.bank.read_shared().items()}
    )
    for slot in (1, 2):
        engine.bank.write(slot, {VECTOR: torch.randn(SPEC.factors + 1, generator=generator)})


def test_tokens_are_the_two_layer_mlp(make_base):
    engine = Engine(make_base(), SPEC, slots=3)
    trained_looking(engine)
    shared = engine.bank.read_shared()
    hidden = engine.model.get_input_embeddings().embedding_dim
    reference = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.GELU(), torch.nn.Linear(7, 3 * hidden))
    with torch.no_grad():
        reference[0].weight.copy_(shared[IN_WEIGHT])
        reference[0].bias.copy_(shared[IN_BIAS])
        reference[2].weight.copy_(shared[OUT_WEIGHT])
        reference[2].bias.copy_(shared[OUT_BIAS])
        users = engine.bank.tensors[VECTOR][1:3]
        got = kinds.get("collab").tokens(SPEC, users, engine.bank.input_stack)
        torch.testing.assert_close(got, reference(users).view(2, 3, hidden), atol=1e-6, rtol=1e-6)


def test_a_collab_row_is_a_prompt_tuning_row_with_the_users_tokens(make_base):
    collab = Engine(make_base(), SPEC, slots=3)
    trained_looking(collab)
    prompt = Engine(make_base(), PromptSpec(virtual_tokens=SPEC.tokens), slots=3)
    with torch.no_grad():
        tokens = kinds.get("collab").tokens(SPEC, collab.bank.tensors[VECTOR][1:3], collab.bank.input_stack)
    for slot in (1, 2):
        prompt.bank.write(slot, {EMBEDDINGS: tokens[slot - 1]})
    rows = [Row(PROMPTS[i][0], PROMPTS[i][1], slot) for i, slot in enumerate((1, 2, 0))]
    with torch.inference_mode():
        got, expected = collab.logits(collab.encode(rows)), prompt.logits(prompt.encode(rows))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_users_part_is_their_vector_alone_at_most_one_kilobyte(make_base):
    engine = Engine(make_base(), CollabSpec(factors=255), slots=2)
    module = engine.bank.read(1)
    assert set(module) == {VECTOR} and module[VECTOR].numel() * 4 == 1024
    with pytest.raises(ModuleSpecError, match="at most 1 KB"):
        kinds.validate(CollabSpec(factors=256))
    for bad in (CollabSpec(tokens=0), CollabSpec(width=0), CollabSpec(factors=-1)):
        with pytest.raises(ModuleSpecError):
            kinds.validate(bad)


def test_the_shared_part_is_checked_whole_before_it_is_written_and_users_never_touch_it(make_base):
    engine = Engine(make_base(), SPEC, slots=3)
    before = engine.bank.read_shared()
    wrong_shape = {**before, IN_BIAS: torch.zeros(8)}
    with pytest.raises(EngineError, match="expects"):
        engine.bank.write_shared(wrong_shape)
    with pytest.raises(EngineError, match="does not fit"):
        engine.bank.write_shared({IN_BIAS: before[IN_BIAS]})
    engine.bank.write(1, {VECTOR: torch.ones(SPEC.factors + 1)})
    engine.bank.clear(1)
    after = engine.bank.read_shared()
    assert all(torch.equal(before[name], after[name]) for name in before)
    # Two banks of one spec start from the same shared values (seeded alike).
    other = Engine(make_base(), SPEC, slots=2).bank.read_shared()
    assert all(torch.equal(before[name], other[name]) for name in before)
