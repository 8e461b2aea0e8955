"""How long does a user who is not resident take to come in? ``SlotManager.acquire`` of a stored user
(a miss: the store's loader reads the module folder, the manager places it in a slot) against reading the
same safetensors file with nothing else, from stores of different sizes. The stores hold the default
spec of the first registered kind (LoRA r8 q,v today), fp16 at rest."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from tailorlm import kinds
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.perf import workloads
from tailorlm.perf.harness import Bench, Section, Timing, timed
from tailorlm.store import module_folder
from tailorlm.store.store import ModuleStore

# The targets. "Flat" load time is not given a number there; 1.25x leaves room for this shared
# machine's noise while still catching a store that scans its folder or grows an index per module.
TARGET_LOAD_VS_RAW = 3.0
TARGET_LOAD_FLAT = 1.25


def load_name(count: int) -> str:
    return f"load into a slot, {count} stored"


def raw_name(count: int) -> str:
    return f"raw safetensors read, {count} stored"


def _user(count: int, index: int) -> str:
    return f"s{count}-user{index:05d}"


def bench_load(bench: Bench) -> Section:
    config = bench.config
    kind = next(iter(kinds.MODEL_KINDS))
    spec = kinds.default_spec(kind)
    base = bench.fresh_base()
    resident = workloads.resident_for(config, base.model, spec)
    engine = Engine(base, spec, slots=resident + 1)
    identity = engine.bank.read(1)
    section = Section(
        "load", f"Cold load of one {workloads.describe(spec)} module (fp16) into a slot of {resident}"
    )
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix="tailorlm-perf-") as root:
        stores: dict[int, ModuleStore] = {}
        for count in config.stores:
            bench.log(f"load: writing a store of {count} modules")
            store = stores[count] = ModuleStore(Path(root) / f"store-{count}")
            for index in range(count):
                module = workloads.random_module(identity, generator)
                store.put(_user(count, index), spec, module, model=engine.model, base_name=engine.base.name)
            section.facts[f"store_{count}_bytes"] = sum(
                module_folder.module_bytes(store.folder(user)) for user in store.users()
            )
        # One manager owns the bank; it finds each user's store by the id's prefix.
        loaders = {count: store.loader(spec) for count, store in stores.items()}
        manager = SlotManager(engine.bank, lambda user: loaders[int(user[1 : user.index("-")])](user))
        seconds: dict[str, list[float]] = {}
        for sample in range(config.warmup + config.load_samples):
            for count, store in stores.items():
                user = _user(count, rng.randrange(count))
                manager.evict(user)  # make it a miss (not timed)
                pair = [
                    (load_name(count), lambda user=user: manager.acquire([user])),
                    (
                        raw_name(count),
                        lambda user=user, store=store: load_file(
                            str(store.folder(user) / module_folder.WEIGHTS_FILE)
                        ),
                    ),
                ]
                # Alternate who goes first: the second reader of a file finds its metadata in CPU caches.
                for name, run in pair if sample % 2 == 0 else reversed(pair):
                    elapsed = timed(run)
                    if sample >= config.warmup:
                        seconds.setdefault(name, []).append(elapsed)
        first_user = next(iter(stores.values())).folder(_user(config.stores[0], 0))
        section.facts["module_file_bytes"] = (first_user / module_folder.WEIGHTS_FILE).stat().st_size
        section.facts["misses"] = manager.misses
    for count in config.stores:
        section.timings.append(Timing(load_name(count), seconds[load_name(count)], resident))
        section.timings.append(Timing(raw_name(count), seconds[raw_name(count)]))
    for count in config.stores:
        section.ratio(
            f"load into a slot / raw read, {count} stored",
            load_name(count),
            raw_name(count),
            TARGET_LOAD_VS_RAW,
            higher_is_better=False,
        )
    smallest, largest = min(config.stores), max(config.stores)
    if largest != smallest:
        section.ratio(
            f"load into a slot, {largest} stored / {smallest} stored",
            load_name(largest),
            load_name(smallest),
            TARGET_LOAD_FLAT,
            higher_is_better=False,
        )
    section.notes.append(
        "a load is SlotManager.acquire of a user who is not resident: the store looks up the user's current "
        "version in its index, checks the weights' sha256, reads the folder, and the manager writes it into "
        "a free (or least recently used) slot. "
        "Files were just written, so both contenders read them from the OS page cache."
    )
    return section
