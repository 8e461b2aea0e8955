"""How fast is a mixed batch (every row a different resident user) through the engine, against the bare
base model and, where PEFT can run mixed batches for the kind, PEFT ``adapter_names``? One full forward
pass each: every position's hidden state and the vocabulary projection at every position (what
``Engine.logits`` does; the bare model and PEFT return the same ``.logits``). One section per registered
kind, with the kind's default spec."""

from __future__ import annotations

import contextlib
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tailorlm import kinds
from tailorlm.engine.engine import Batch, Engine, Row
from tailorlm.engine.slots import SlotManager
from tailorlm.kinds import ModuleSpec
from tailorlm.perf import workloads
from tailorlm.perf.contenders import (
    BARE,
    ENGINE,
    PEFT_MIXED,
    forward_inputs,
    peft_mixes_batches,
    peft_with_users,
)
from tailorlm.perf.harness import Bench, Section, Timing
from tailorlm.store.store import ModuleStore

# The targets: a mixed batch at 0.9x the bare model's speed for LoRA, 0.85x for every other kind
# (a kind added later included), and 1.5x PEFT's speed wherever PEFT can run the batch at all.
TARGET_VS_BASE = 0.85
TARGET_VS_BASE_BY_KIND = {"lora": 0.9}
TARGET_VS_PEFT = 1.5


def target_vs_base(kind: str) -> float:
    return TARGET_VS_BASE_BY_KIND.get(kind, TARGET_VS_BASE)


@dataclass
class MixedSetup:
    """A bank of random resident users, ``users_per_batch`` of them in one batch of chat prompts, and (when
    PEFT mixes batches for the kind) the PEFT model holding the same users' modules."""

    engine: Engine
    slots: SlotManager
    resident: int
    users: list[str]  # the batch's users, one per row
    prompts: list[str]
    batch: Batch
    peft_model: object | None

    @property
    def row_slots(self) -> list[int]:
        return [int(slot) for slot in self.batch.slot_ids]


@contextlib.contextmanager
def mixed_setup(bench: Bench, spec: ModuleSpec, label: str) -> Iterator[MixedSetup]:
    """Build the setup; the batch's users stay pinned (an in-flight batch) until the block ends."""
    config = bench.config
    base = bench.fresh_base()
    resident = workloads.resident_for(config, base.model, spec)
    bench.log(f"{label}: placing {resident} resident users")
    engine = Engine(base, spec, slots=resident + 1, max_length=max(512, config.tokens + 8))
    manager = SlotManager(engine.bank)
    everyone = workloads.place_random_users(manager, resident, config.seed)
    users = random.Random(config.seed).sample(everyone, config.users_per_batch)
    peft_model = None
    with tempfile.TemporaryDirectory(prefix="tailorlm-perf-") as root:
        if peft_mixes_batches(spec):
            # PEFT reads the modules from the files the store writes (fp16); the engine takes the same
            # files back, so both hold the same numbers.
            store = ModuleStore(root)
            for user in users:
                tensors = engine.bank.read(manager.slot_of(user))
                store.put(user, spec, tensors, model=engine.model, base_name=engine.base.name)
                manager.place(user, store.loader(spec)(user))
            peft_model = peft_with_users(bench.fresh_base().model, store, users)
        with manager.pinned(users) as placed:
            prompts = workloads.chat_prompts(bench.tokenizer, config.tokens, len(users), config.seed)
            batch = engine.encode([Row(p, "", placed[u]) for p, u in zip(prompts, users, strict=True)])
            yield MixedSetup(engine, manager, resident, users, prompts, batch, peft_model)


def mixed_facts(bench: Bench, setup: MixedSetup, spec: ModuleSpec) -> dict:
    return {
        "spec": kinds.spec_to_dict(spec),
        "resident": setup.resident,
        "users": setup.users,
        "rows": len(setup.batch),
        "width": setup.batch.input_ids.shape[1],
        "real_tokens": int(setup.batch.attention_mask.sum()),
        "numbers_per_user": workloads.numbers_per_user(bench.bare.model, spec),
    }


def bench_mixed(bench: Bench, kind: str) -> Section:
    """A batch of ``users_per_batch`` distinct users out of the resident ones through every contender."""
    config = bench.config
    spec = kinds.default_spec(kind)
    bare = bench.bare
    with mixed_setup(bench, spec, kind) as setup:
        engine, batch, peft_model = setup.engine, setup.batch, setup.peft_model
        inputs = forward_inputs(batch)
        contenders: dict[str, Callable[[], object]] = {
            ENGINE: lambda: engine.logits(batch),
            BARE: lambda: bare.model(**inputs).logits,
        }
        if peft_model is not None:
            contenders[PEFT_MIXED] = lambda: peft_model(**inputs, adapter_names=setup.users).logits
        section = Section(
            kind,
            f"Mixed batch, {kind} ({workloads.settings_text(spec)}): {len(setup.users)} distinct users out "
            f"of {setup.resident} resident",
            facts=mixed_facts(bench, setup, spec),
        )
        with torch.inference_mode():
            if peft_model is not None:
                real = batch.attention_mask.bool()
                difference = (engine.logits(batch) - contenders[PEFT_MIXED]())[real].abs().max()
                section.facts["max_abs_logit_diff_vs_peft"] = float(difference)
            seconds = bench.interleaved(kind, contenders)
    section.timings = [
        Timing(ENGINE, seconds[ENGINE], resident=setup.resident),
        Timing(BARE, seconds[BARE], resident=0),
    ]
    section.ratio("engine speed vs bare base model", BARE, ENGINE, target_vs_base(kind))
    if peft_model is not None:
        section.timings.append(Timing(PEFT_MIXED, seconds[PEFT_MIXED], resident=len(setup.users)))
        section.ratio("engine speed vs PEFT adapter_names", PEFT_MIXED, ENGINE, TARGET_VS_PEFT)
    else:
        section.notes.append(f"stock PEFT cannot run a batch mixing {kind} adapters: no PEFT contender.")
    section.notes.append(
        f"{len(batch)} rows, {section.facts['real_tokens']} real tokens, left padded to "
        f"{section.facts['width']}; full forward with logits at every position on every contender."
    )
    if kinds.of(spec).input_shapes(spec, bare.model):
        section.notes.append(
            f"a {kind} module acts on the model's inputs: the engine also runs the positions it puts in "
            "front of each row (prompt tuning's virtual tokens); that is the module's own cost, not overhead."
        )
    if setup.resident < config.resident:
        section.notes.append(
            f"{setup.resident} resident instead of {config.resident}: a {kind} user is "
            f"{4 * section.facts['numbers_per_user'] / 1e6:.1f} MB in fp32 and the bank is capped at "
            f"{config.bank_budget_bytes / 2**30:.0f} GiB."
        )
    return section
