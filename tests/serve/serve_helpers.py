"""Helpers of the server tests: a store with users of every kind (distinct random modules on the tiny
model, some history, a key each; the collab users' shared part made here too) and a server
configuration on loopback.

Imported as ``serve_helpers``: pytest puts tests/serve on sys.path when it loads this folder's conftest."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kind_helpers import ALL_KINDS, SPECS
from tailorlm import kinds, models
from tailorlm.engine.engine import Engine
from tailorlm.methods.collab import CollabPart, ItemFactors
from tailorlm.serve.config import ServeConfig
from tailorlm.serve.run import free_port
from tailorlm.serve.scheduler import SchedulerConfig
from tailorlm.store.index import HistoryRecord
from tailorlm.users.service import UserService


@dataclass
class Users:
    root: Path
    keys: dict[str, str] = field(default_factory=dict)  # user id -> their key
    kinds: dict[str, str] = field(default_factory=dict)  # user id -> kind
    admin: str = ""


def random_module(tiny: models.BaseModel, kind: str, seed: int) -> dict[str, torch.Tensor]:
    engine = Engine(fresh(tiny), SPECS[kind], slots=2)
    generator = torch.Generator().manual_seed(seed)
    engine.bank.reset(1, generator)
    return {n: t + 0.05 * torch.randn(t.shape, generator=generator) for n, t in engine.bank.read(1).items()}


def fresh(tiny: models.BaseModel) -> models.BaseModel:
    return models.BaseModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.name, None)


def shared_part_folder(folder: Path, tiny: models.BaseModel, kind: str) -> Path:
    """A collab part for the tiny model with no task adapter under it: the bank's seeded MLP moved off its
    initialisation (as training would), and six items' factors."""
    spec = SPECS[kind]
    engine = Engine(fresh(tiny), spec, slots=2)
    generator = torch.Generator().manual_seed(7)
    shared = {
        n: t + 0.05 * torch.randn(t.shape, generator=generator) for n, t in engine.bank.read_shared().items()
    }
    factors = {
        f"item-{i}": torch.randn(spec.factors, generator=generator, dtype=torch.float64) for i in range(6)
    }
    items = ItemFactors(1.0, {key: 0.1 for key in factors}, factors, spec.factors, penalty=1.0)
    CollabPart(spec, shared, items, task_adapter=None).save(folder)
    return folder


def build_store(root: Path, tiny: models.BaseModel, per_kind: int = 2) -> Users:
    service = UserService(root, load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", base_model=models.TINY_MODEL)
    for kind in ALL_KINDS:  # a kind whose users share a trained part: the store keeps one for them
        if kinds.MODEL_KINDS[kind].has_shared_part:
            service.configure(collab=shared_part_folder(root.parent / f"{root.name}-{kind}-part", tiny, kind))
    users = Users(root)
    for k, kind in enumerate(ALL_KINDS):
        for i in range(per_kind):
            user_id = f"{kind}-user-{i}"
            history = [
                HistoryRecord(f"{user_id}-{j}", f"{user_id} saw item {j}", "yes" if (i + j) % 2 else "no")
                for j in range(4)
            ]
            service.add(user_id, kind, history)
            module = random_module(tiny, kind, seed=100 * k + i)
            service.store.put(user_id, SPECS[kind], module, model=tiny.model, base_name=models.TINY_MODEL)
            users.keys[user_id] = service.issue_key(user_id)
            users.kinds[user_id] = kind
    users.admin = service.issue_key(None, admin=True)
    service.close()
    return users


def serve_config(root: Path, **options) -> ServeConfig:
    options.setdefault("scheduler", SchedulerConfig(max_batch=8, wait_ms=5.0, max_queue=64))
    options.setdefault("slots", 3)
    options.setdefault("max_context", 256)
    # Every test client shares 127.0.0.1, and the key tests send many bad keys on purpose: the throttle of
    # failed authentications has tests of its own (test_limits.py).
    options.setdefault("auth_failure_burst", 10_000.0)
    return ServeConfig(store=root, port=free_port(), **options)


def wait_settled(server, seconds: float = 10.0) -> None:
    """Wait until nothing is pending and no slot is pinned (what every request leaves when it ends)."""
    deadline = time.monotonic() + seconds
    while server.scheduler.pending() or sum(m.pins() for m in server.managers):
        if time.monotonic() > deadline:
            raise AssertionError("requests or pins were left behind")
        time.sleep(0.02)
