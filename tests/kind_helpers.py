"""Helpers shared by the tests of kinds, engine, store and train: every registered kind's default spec,
rows to run, users to train, and ways to give slots distinct modules.

Imported as ``kind_helpers`` (tests/conftest.py puts tests/ on sys.path). Nothing here names a kind: a
kind that registers itself is tested by every test that iterates ``SPECS`` or the lists below.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from tailorlm import kinds
from tailorlm.engine.engine import Engine
from tailorlm.store import module_folder
from tailorlm.train.trainer import UserData

# Every registered kind at its default settings: a new kind is tested by registering it.
SPECS = {name: kinds.default_spec(name) for name in kinds.MODEL_KINDS}
ALL_KINDS = list(SPECS)
PEFT_KINDS = [name for name, kind in kinds.MODEL_KINDS.items() if kind.peft_type]
MERGEABLE_KINDS = [name for name, kind in kinds.MODEL_KINDS.items() if kind.mergeable]
UNMERGEABLE_KINDS = [name for name, kind in kinds.MODEL_KINDS.items() if not kind.mergeable]

PROMPTS = [
    ("Rate this: the bus did not stop.", "yes"),
    ("Short", "no"),
    ("A rather longer prompt so that the other rows need left padding in a batch", "perhaps not"),
    ("Medium sized prompt here", "yes"),
]


def personalize(engine: Engine, slots: Iterable[int], seed: int = 1, noise: float = 0.05) -> None:
    """Give slots distinct non-identity modules, so a row that used the wrong user's module would show."""
    generator = torch.Generator().manual_seed(seed)
    for slot in slots:
        engine.bank.reset(slot, generator)
        module = {
            n: t + noise * torch.randn(t.shape, generator=generator)
            for n, t in engine.bank.read(slot).items()
        }
        engine.bank.write(slot, module)


def load_into(engine: Engine, slot: int, folder: str | Path) -> dict:
    """Put the module stored in ``folder`` into ``slot``; returns its metadata."""
    stored = module_folder.read_for(engine.spec, folder)
    engine.bank.write(slot, stored.tensors)
    return stored.meta


def make_user(name: str, size: int, val: int = 0) -> UserData:
    """A user with ``size`` training and ``val`` validation pairs whose answers depend on the name."""
    pairs = [
        (f"{name} says item {i}: is it good?", "yes" if (i + len(name)) % 2 else "no")
        for i in range(size + val)
    ]
    return UserData(name, pairs[:size], pairs[size:])


def row_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """A row's token ids as the engine encodes them alone: prompt, target, end of sequence."""
    return (
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
        + tokenizer(target, add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
    )
