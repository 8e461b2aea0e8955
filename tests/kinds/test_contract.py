"""The contract every registered module kind meets, as a matrix (PEFT's test matrix, in the small): the
cases are ``kinds.MODEL_KINDS`` (the kinds that change logits), crossed with the common test functions
below. A new kind is held to all of it
by registering; nothing here names a kind. What a kind may lack is read from the kind itself: PEFT has
no such kind (``peft_type`` is None), it cannot be folded into the base (``mergeable``), a new user
already changes outputs (``starts_as_identity``); each such declaration is itself checked.

Tolerances (fp32, tiny 2-layer model, logits of magnitude ~1): 1e-4 where two paths do the same arithmetic
on differently shaped batches (padding, other rows, PEFT's layers, merged weights) and so differ by float
rounding in reductions; 1e-5 for slot 0 against the bare model and 1e-6 for a module reloaded into another
engine, where the arithmetic is the same up to which rows share the batch.

The same contract holds on a bf16 base (users' modules fp32, as ``--dtype auto`` runs on a CPU with fast
bf16): every tensor between layers is rounded to bf16's 8 significant bits, so two paths that differ by
float rounding can land one bf16 step apart, 2**-7 = 0.0078 for logits in [1, 2). The bf16 cases allow two
steps, 0.016 (measured: at most 0.0045 on these rows); a row routed to another user's module moves its
logits by ~0.1 (``personalize``'s noise), so they still catch that.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import PeftModel

from kind_helpers import (
    ALL_KINDS,
    MERGEABLE_KINDS,
    PEFT_KINDS,
    PROMPTS,
    SPECS,
    UNMERGEABLE_KINDS,
    load_into,
    make_user,
    personalize,
    row_ids,
)
from tailorlm import kinds
from tailorlm.engine.engine import Engine, Row
from tailorlm.kinds import ModuleSpecError
from tailorlm.store import module_folder
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, seed_for

every_kind = pytest.mark.parametrize("name", ALL_KINDS)
peft_kinds = pytest.mark.parametrize("name", PEFT_KINDS)
# (the base's dtype, the tolerance of logits of two paths that round differently): see the docstring
BF16_ATOL = 1.6e-2
precisions = pytest.mark.parametrize(("base_dtype", "atol"), [("fp32", 1e-4), ("bf16", BF16_ATOL)])


def _rows(slots: list[int]) -> list[Row]:
    return [Row(prompt, target, slot) for (prompt, target), slot in zip(PROMPTS, slots, strict=True)]


@torch.no_grad()
def _logits(engine: Engine, rows: list[Row]) -> torch.Tensor:
    return engine.logits(engine.encode(rows))


@torch.no_grad()
def _bare_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """One unpadded row through a plain (unwrapped, or PEFT-wrapped) model: [positions, vocab]."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    return logits[-len(ids) :]  # prompt tuning puts its virtual positions in front


# ---- (a) a mixed batch is each of its users alone ------------------------------------------------------


@every_kind
@precisions
def test_mixed_batch_rows_equal_each_user_alone(name, base_dtype, atol, make_engine):
    engine = make_engine(name, dtype=base_dtype)
    personalize(engine, [1, 2, 3])
    rows = _rows([1, 2, 0, 3])
    mixed = _logits(engine, rows)
    for index, row in enumerate(rows):
        alone = _logits(engine, [row])[0]
        torch.testing.assert_close(mixed[index, -alone.shape[0] :], alone, atol=atol, rtol=0)


@peft_kinds
@precisions
def test_mixed_batch_rows_equal_stock_peft_alone(name, base_dtype, atol, make_engine, make_base, tmp_path):
    """Stock PEFT on the same base dtype, its adapters upcast to fp32 (``autocast_adapter_dtype``, its
    default), against the engine's fp32 bank: the same mixed-precision recipe on both sides."""
    engine = make_engine(name, dtype=base_dtype)
    personalize(engine, [1, 2, 3])
    rows = _rows([1, 2, 0, 3])
    batch = engine.encode(rows)
    with torch.no_grad():
        mixed = engine.logits(batch)
    folders = {
        s: module_folder.save_module(engine, s, tmp_path / f"user{s}", dtype="float32") for s in (1, 2, 3)
    }
    for index, row in enumerate(rows):
        length = int(batch.attention_mask[index].sum())
        ids = batch.input_ids[index, -length:].tolist()
        if row.slot == 0:
            alone = _bare_logits(make_base(base_dtype).model, ids)
        else:
            peft_model = PeftModel.from_pretrained(make_base(base_dtype).model, str(folders[row.slot])).eval()
            alone = _bare_logits(peft_model, ids)
        torch.testing.assert_close(mixed[index, -length:], alone, atol=atol, rtol=0)


# ---- (b) slot 0 is the identity; a new user is where the kind says so ----------------------------------


@every_kind
def test_slot_zero_is_the_bare_model_and_a_personal_module_is_not(name, make_engine, tiny):
    engine = make_engine(name)
    personalize(engine, [1])
    prompt, target = PROMPTS[0]
    base_row = _logits(engine, [Row(prompt, target, 0)])[0]
    user_row = _logits(engine, [Row(prompt, target, 1)])[0]
    reference = _bare_logits(tiny.model, row_ids(engine.tokenizer, prompt, target))
    torch.testing.assert_close(base_row, reference, atol=1e-5, rtol=0)
    assert (user_row - base_row).abs().max() > 1e-3


@every_kind
def test_slot_zero_rows_in_a_mixed_batch_are_the_bare_model(name, make_engine, tiny):
    engine = make_engine(name)
    personalize(engine, [1, 2])
    rows = _rows([1, 0, 2, 0])
    batch = engine.encode(rows)
    with torch.no_grad():
        mixed = engine.logits(batch)
    for index in (1, 3):
        length = int(batch.attention_mask[index].sum())
        reference = _bare_logits(tiny.model, batch.input_ids[index, -length:].tolist())
        torch.testing.assert_close(mixed[index, -length:], reference, atol=1e-4, rtol=0)


@every_kind
def test_a_fresh_bank_holds_the_identity_in_every_slot(name, make_engine):
    engine = make_engine(name)
    assert all(engine.bank.is_identity(slot) for slot in range(engine.bank.slots))
    personalize(engine, [2])
    assert not engine.bank.is_identity(2)
    engine.bank.clear(2)
    assert engine.bank.is_identity(2)


@every_kind
def test_a_new_user_is_the_bare_model_exactly_when_the_kind_says_so(name, make_engine, tiny):
    engine = make_engine(name)
    engine.bank.reset(1, torch.Generator().manual_seed(0))
    prompt, target = PROMPTS[0]
    reference = _bare_logits(tiny.model, row_ids(engine.tokenizer, prompt, target))
    fresh = _logits(engine, [Row(prompt, target, 1), Row(*PROMPTS[2], 1)])[0, -len(reference) :]
    if engine.bank.kind.starts_as_identity:
        torch.testing.assert_close(fresh, reference, atol=1e-5, rtol=0)
    else:  # the declaration must not hide a kind that could start as the identity
        assert (fresh - reference).abs().max() > 1e-4


# ---- (c) a saved module reloads exactly, and PEFT reads it -----------------------------------------------


@every_kind
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
def test_saved_module_reloads_bit_identical(name, dtype, base_dtype, make_engine, tmp_path):
    """``dtype`` is the module's at rest; ``base_dtype`` the engine's base (the bank is fp32 on both)."""
    engine = make_engine(name, slots=3, dtype=base_dtype)
    personalize(engine, [1])
    written = engine.bank.read(1)
    folder = module_folder.save_module(engine, 1, tmp_path / "m", dtype=dtype, meta={"user": "ann"})
    stored = module_folder.read_module(folder)
    assert stored.spec == engine.spec and stored.meta["user"] == "ann" and stored.meta["dtype"] == dtype
    assert set(stored.tensors) == set(written)
    at_rest = getattr(torch, dtype)
    for tensor_name, value in written.items():
        assert stored.tensors[tensor_name].dtype == at_rest
        assert torch.equal(stored.tensors[tensor_name].float(), value.to(at_rest).float()), tensor_name
    load_into(engine, 2, folder)
    for tensor_name, value in engine.bank.read(2).items():
        assert torch.equal(value, written[tensor_name].to(at_rest).float()), tensor_name


@every_kind
@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
def test_a_reloaded_module_serves_the_same_outputs_in_another_engine(name, base_dtype, make_engine, tmp_path):
    engine = make_engine(name, dtype=base_dtype)
    personalize(engine, [1])
    folder = module_folder.save_module(engine, 1, tmp_path / "m", dtype="float32")
    other = make_engine(name, dtype=base_dtype)
    load_into(other, 2, folder)
    torch.testing.assert_close(
        _logits(engine, _rows([1] * 4)), _logits(other, _rows([2] * 4)), atol=1e-6, rtol=0
    )


@peft_kinds
def test_saved_module_loads_in_stock_peft_with_the_same_outputs(name, make_engine, make_base, tmp_path):
    source = make_engine(name)
    personalize(source, [2])
    folder = module_folder.save_module(source, 2, tmp_path / "user")  # fp16 at rest, the default
    peft_config = json.loads((folder / module_folder.PEFT_CONFIG_FILE).read_text())
    assert peft_config["peft_type"] == kinds.get(name).peft_type
    engine = make_engine(name)
    load_into(engine, 1, folder)
    prompt, target = PROMPTS[2]
    ours = _logits(engine, [Row(prompt, target, 1)])[0]
    peft_model = PeftModel.from_pretrained(make_base().model, str(folder)).eval()
    theirs = _bare_logits(peft_model, row_ids(engine.tokenizer, prompt, target))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@peft_kinds
def test_a_folder_written_by_stock_peft_reads_into_the_bank(name, make_engine, make_base, tmp_path):
    engine = make_engine(name)
    personalize(engine, [1])
    ours = module_folder.save_module(engine, 1, tmp_path / "ours", dtype="float32")
    peft_model = PeftModel.from_pretrained(make_base().model, str(ours))
    # PEFT's own keys and config, no tailorlm.json. save_embedding_layers=False: PEFT would otherwise look
    # the base's name up online to see whether its vocabulary changed.
    peft_model.save_pretrained(str(tmp_path / "theirs"), save_embedding_layers=False)
    assert not (tmp_path / "theirs" / module_folder.META_FILE).exists()
    stored = module_folder.read_for(engine.spec, tmp_path / "theirs")
    written = engine.bank.read(1)
    assert set(stored.tensors) == set(written)
    for tensor_name, value in written.items():
        assert torch.equal(stored.tensors[tensor_name].float(), value), tensor_name


# ---- (d) a user trained in a group is that user trained alone -------------------------------------------


@every_kind
def test_users_trained_together_equal_users_trained_alone(name, make_engine):
    users = [make_user("ann", 5, val=2), make_user("bob", 3, val=2), make_user("cy", 7, val=1)]
    config = TrainConfig(epochs=2, batch_size=2, learning_rate=5e-3, warmup_ratio=0.2, weight_decay=0.01)
    # Several forward/backward passes per step: whole users (3 rows a pass), and a pass a row, which cuts
    # each user's batch apart (a batch over the limits: long rows).
    passes = [dataclasses.replace(config, micro_batch_rows=rows) for rows in (3, 1)]
    together = [
        {r.user_id: r for r in MultiUserTrainer(make_engine(name, slots=4), chunked).run(users)}
        for chunked in passes
    ]
    alone_engine = make_engine(name, slots=2)
    for user in users:
        alone = MultiUserTrainer(alone_engine, config).run([user])[0]
        for mixed in (trained[user.user_id] for trained in together):
            assert alone.steps == mixed.steps
            for tensor_name, value in alone.module.items():
                torch.testing.assert_close(mixed.module[tensor_name], value, atol=2e-5, rtol=1e-4)
            assert mixed.val_losses == pytest.approx(alone.val_losses, abs=1e-5)
            assert mixed.train_losses == pytest.approx(alone.train_losses, abs=1e-5)


@every_kind
def test_users_trained_together_equal_users_trained_alone_on_a_bf16_base(name, make_engine):
    """The same on a bf16 base (fp32 modules and optimizer state). The gradients carry bf16 rounding, and
    Adam steps about +-lr on a coordinate whatever its gradient's size, so a coordinate whose gradient is
    near zero can step apart by up to one lr per step: compared is each user's whole update, whose
    difference between together and alone is under 5% of its size (measured: under 1.5%), where a user
    trained on another user's rows would differ by about all of it; validation losses within 2e-3."""
    users = [make_user("ann", 5, val=2), make_user("bob", 3, val=2), make_user("cy", 7, val=1)]
    config = TrainConfig(epochs=2, batch_size=2, learning_rate=5e-3, warmup_ratio=0.2, weight_decay=0.01)
    chunked = dataclasses.replace(config, micro_batch_rows=3)
    trained = MultiUserTrainer(make_engine(name, slots=4, dtype="bf16"), chunked).run(users)
    together = {r.user_id: r for r in trained}
    alone_engine = make_engine(name, slots=2, dtype="bf16")
    start = make_engine(name, slots=2, dtype="bf16")
    for user in users:
        alone = MultiUserTrainer(alone_engine, config).run([user])[0]
        mixed = together[user.user_id]
        start.bank.reset(1, torch.Generator().manual_seed(seed_for(config.seed, user.user_id, "init")))
        initial = start.bank.read(1)
        assert alone.steps == mixed.steps
        update = torch.cat([(alone.module[n] - t).flatten() for n, t in initial.items()])
        apart = torch.cat([(mixed.module[n] - alone.module[n]).flatten() for n in initial])
        assert all(t.dtype == torch.float32 for t in mixed.module.values())
        assert update.norm() > 0
        assert apart.norm() < 0.05 * update.norm(), float(apart.norm() / update.norm())
        assert mixed.val_losses == pytest.approx(alone.val_losses, abs=2e-3)


# ---- (e) a spec survives its serialisations -----------------------------------------------------------


@every_kind
def test_spec_round_trips_through_a_dict_and_json(name):
    spec, kind = SPECS[name], kinds.get(name)
    data = kinds.spec_to_dict(spec)
    assert data["kind"] == name
    assert kinds.spec_from_dict(json.loads(json.dumps(data))) == spec
    assert kind.spec_from_dict({k: v for k, v in data.items() if k != "kind"}) == spec
    assert kinds.of(spec) is kind and kinds.same_layout(spec, spec)


@peft_kinds
def test_spec_round_trips_through_a_peft_config(name, tiny, tmp_path):
    spec, kind = SPECS[name], kinds.get(name)
    config = kind.peft_config(spec, tiny.model, None)
    assert config.peft_type == kind.peft_type
    # PEFT keeps target_modules as a set in memory (a list once written), so the order of names does not
    # survive: the spec read back must hold the same layout, and be a fixed point from then on.
    back = kinds.spec_from_peft_config(config.to_dict())
    assert kinds.same_layout(back, spec)
    assert kind.spec_from_peft(kind.peft_config(back, tiny.model, None).to_dict()) == back
    config.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / module_folder.PEFT_CONFIG_FILE).read_text())
    assert kinds.spec_from_peft_config(written) == back


# ---- (f) merging into the base ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MERGEABLE_KINDS)
@pytest.mark.parametrize("into", ["bare model", "engine's model"])
def test_merged_module_equals_serving_it_from_a_slot(name, into, make_engine, make_base):
    engine = make_engine(name)
    personalize(engine, [1], noise=0.2)
    module = engine.bank.read(1)
    rows = _rows([1] * 4)
    batch = engine.encode(rows)
    with torch.no_grad():
        served = engine.logits(batch)
    merge = kinds.get(name).merge_into_base
    if into == "bare model":
        base = make_base()
        assert merge(engine.spec, base.model, module) == len(engine.bank.layers)
        for index in range(len(rows)):
            length = int(batch.attention_mask[index].sum())
            merged = _bare_logits(base.model, batch.input_ids[index, -length:].tolist())
            torch.testing.assert_close(merged, served[index, -length:], atol=1e-4, rtol=0)
    else:
        # Through the slot layers to the base projections: OPPU merges its task module into the base of
        # an engine whose personal modules (of any kind) then build on it, served in slot 0.
        other = make_engine(name)
        assert merge(engine.spec, other.model, module) == len(engine.bank.layers)
        torch.testing.assert_close(_logits(other, _rows([0] * 4)), served, atol=1e-4, rtol=0)
    for tensor_name, value in engine.bank.read(1).items():  # merging reads the module, never changes it
        assert torch.equal(value, module[tensor_name])


@pytest.mark.parametrize("name", UNMERGEABLE_KINDS)
def test_an_unmergeable_kind_refuses_to_merge(name, make_engine, make_base):
    engine = make_engine(name)
    personalize(engine, [1])
    with pytest.raises(ModuleSpecError, match="cannot be folded into the base"):
        kinds.get(name).merge_into_base(engine.spec, make_base().model, engine.bank.read(1))


# ---- (g) the count of one user's numbers --------------------------------------------------------------


@every_kind
def test_parameter_count_is_the_numbers_one_user_owns(name, make_engine):
    engine = make_engine(name)
    personalize(engine, [1])
    count = engine.bank.parameter_count()
    assert count > 0
    assert count == sum(t.numel() for t in engine.bank.read(1).values())


# ---- (h) training reaches every tensor, and only the batch's users --------------------------------------


@every_kind
def test_training_gives_every_tensor_gradients_on_the_batchs_slots_only(name, make_engine):
    engine = make_engine(name, slots=5)
    personalize(engine, [1, 2, 3, 4])  # non-identity everywhere, so a stray gradient would show
    assert not any(t.requires_grad for t in engine.bank.tensors.values())
    used, unused = (1, 2), (3, 4)
    with engine.training():
        sums, _ = engine.token_nll(engine.encode(_rows([1, 2, 0, 1])))
        sums.sum().backward()
    assert not any(t.requires_grad for t in engine.bank.tensors.values())
    assert all(p.grad is None for p in engine.model.parameters())  # the base stays frozen
    for tensor_name, tensor in engine.bank.tensors.items():
        assert tensor.grad is not None, tensor_name
        for slot in used:
            assert tensor.grad[slot].abs().max() > 0, (tensor_name, slot)
        for slot in unused:
            assert not tensor.grad[slot].any(), (tensor_name, slot)
