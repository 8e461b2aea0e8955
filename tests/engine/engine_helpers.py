from __future__ import annotations

import torch

from tailorlm import kinds
from tailorlm.engine.engine import Engine
from tailorlm.store import module_folder

# Every registered kind at its default settings: a new kind is tested by registering it.
SPECS = {name: kinds.default_spec(name) for name in kinds.names()}
PEFT_KINDS = [name for name, kind in kinds.KINDS.items() if kind.peft_type]

PROMPTS = [
    ("Rate this: the bus did not stop.", "yes"),
    ("Short", "no"),
    ("A rather longer prompt so that the other rows need left padding in a batch", "perhaps not"),
    ("Medium sized prompt here", "yes"),
]


def personalize(engine: Engine, slots, seed: int = 1, noise: float = 0.05) -> None:
    """Give slots distinct non-identity modules, so a row that used the wrong user's module would show."""
    generator = torch.Generator().manual_seed(seed)
    for slot in slots:
        engine.bank.reset(slot, generator)
        module = {
            n: t + noise * torch.randn(t.shape, generator=generator)
            for n, t in engine.bank.read(slot).items()
        }
        engine.bank.write(slot, module)


def load_into(engine: Engine, slot: int, folder) -> dict:
    """Put the module stored in ``folder`` into ``slot``; returns its metadata."""
    stored = module_folder.read_for(engine.spec, folder)
    engine.bank.write(slot, stored.tensors)
    return stored.meta
