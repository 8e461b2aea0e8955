"""The slot bank: one user's tensors in and out of one slot, named errors for a bank that cannot be built or
a module that does not fit, and the bank's own bookkeeping, for every registered kind."""

from __future__ import annotations

import copy

import pytest
import torch

from kind_helpers import ALL_KINDS, SPECS, load_into, personalize
from tailorlm.engine.bank import EngineError, SlotBank, SlotRouter
from tailorlm.engine.engine import Engine
from tailorlm.kinds import ModuleSpecError
from tailorlm.kinds.lora import LoraSpec
from tailorlm.store import module_folder


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_load_into_one_slot_leaves_the_others_untouched(kind, make_engine, tmp_path):
    engine = make_engine(kind, slots=4)
    personalize(engine, [1, 2, 3])
    folder = module_folder.save_module(engine, 3, tmp_path / "m")
    before = {s: engine.bank.read(s) for s in (1, 3)}
    load_into(engine, 2, folder)
    for slot, tensors in before.items():
        for name, value in engine.bank.read(slot).items():
            assert torch.equal(value, tensors[name])
    for name, value in engine.bank.read(2).items():
        torch.testing.assert_close(value, before[3][name], atol=1e-3, rtol=1e-3)  # fp16 round trip


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_module_that_does_not_fit_is_refused_and_leaves_the_slot_as_it_was(kind, make_engine):
    engine = make_engine(kind, slots=3)
    personalize(engine, [1])
    before = engine.bank.read(1)
    first, *rest = sorted(before)
    with pytest.raises(EngineError, match="module does not fit this bank"):
        engine.bank.write(1, {name: before[name] for name in rest} | {"stranger": before[first]})
    # A wrong shape anywhere is found before anything is copied: no half-written user.
    wrong = {name: value + 1 for name, value in before.items()}
    last = sorted(wrong)[-1]
    wrong[last] = wrong[last].flatten()[:-1]
    with pytest.raises(EngineError, match=f"tensor {last} has shape"):
        engine.bank.write(1, wrong)
    for name, value in engine.bank.read(1).items():
        assert torch.equal(value, before[name]), name


def test_slots_out_of_range_are_named_errors(make_engine):
    bank = make_engine("lora", slots=3).bank
    generator = torch.Generator()
    for slot in (0, 3, -1):
        for use in (bank.read, bank.clear, lambda s: bank.reset(s, generator)):
            with pytest.raises(EngineError, match=f"slot {slot} is out of range"):
                use(slot)


def test_wrapping_twice_and_unknown_projections_are_named_errors(make_engine, make_base):
    engine = make_engine("lora", slots=3)
    with pytest.raises(EngineError, match="already carries slot layers"):
        type(engine)(engine.base, SPECS["lora"])
    with pytest.raises(ModuleSpecError, match="no linear projection named"):
        Engine(make_base(), LoraSpec(targets=("query",)))
    with pytest.raises(EngineError, match="at least 2 slots"):
        SlotBank(make_base().model, SPECS["lora"], 1, SlotRouter())


def test_a_slot_layer_outside_the_engine_is_a_named_error(make_engine):
    engine = make_engine("lora")
    with pytest.raises(EngineError, match="ran outside Engine"):
        engine.model(input_ids=torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_new_user_is_the_same_fp32_module_on_every_base_dtype(kind, tiny):
    """Mixed precision: the bank holds users in fp32 whatever the base computes in, and ``reset`` draws
    on the CPU, so one seed gives bit for bit one user on an fp32, bf16 or fp16 base."""
    banks = {
        dtype: SlotBank(copy.deepcopy(tiny.model).to(dtype), SPECS[kind], 2, SlotRouter())
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    }
    for bank in banks.values():
        bank.reset(1, torch.Generator().manual_seed(7))
    full = banks[torch.float32].read(1)
    for dtype in (torch.bfloat16, torch.float16):
        other = banks[dtype].read(1)
        for name, value in full.items():
            assert other[name].dtype == torch.float32
            assert torch.equal(other[name], value), (dtype, name)


def test_trainable_switches_the_bank_not_the_base(make_engine):
    engine = make_engine("lora", slots=3)
    engine.bank.trainable(True)
    assert all(t.requires_grad for t in engine.bank.tensors.values())
    assert all(layer.training for layer in engine.bank.layers)
    assert not any(p.requires_grad for p in engine.model.parameters())
    engine.bank.trainable(False)
    assert not any(t.requires_grad for t in engine.bank.tensors.values())
    assert not any(layer.training for layer in engine.bank.layers)
    # The bank's tensors are the bank's: the wrapped model's own walks see only the base weights.
    bank_ids = {id(t) for t in engine.bank.tensors.values()}
    assert not bank_ids & {id(p) for p in engine.model.parameters()}
