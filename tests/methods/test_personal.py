"""Training a personal part (``methods.personal``): one road for the benchmark and the users service, a
part made as its kind declares, progress counted in the maker's own unit, and no generic code that names
a kind (tiny model)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from tailorlm import kinds
from tailorlm.data import load_task
from tailorlm.kinds.label_bias import LabelBias, LabelBiasSpec
from tailorlm.methods.deps import MethodDeps, MethodSettings
from tailorlm.methods.personal import (
    PersonalSetup,
    PersonalTraining,
    personal_config,
    train_personal,
    work_units,
)
from tailorlm.methods.recipes import Recipe
from tailorlm.methods.setups import PERSONAL_KINDS, ModuleRecipe
from tailorlm.store.store import ModuleStore
from tailorlm.users.service import UserService

SRC = Path(__file__).resolve().parents[2] / "src" / "tailorlm"
# Code that may name a kind, and why: the formats it writes hold one kind only.
NAMES_A_KIND = {"users/export.py": "vLLM, LoRAX and llama.cpp load LoRA adapters and nothing else"}
# One epoch of small batches, two users per step: a few steps per verbagg user.
SETTINGS = MethodSettings(epochs=1, batch_size=4, users_per_step=2)
USERS = ["1", "2", "3"]


def _deps(task, make_base, tmp_path) -> MethodDeps:
    return MethodDeps(task, make_base, tmp_path / "modules", settings=SETTINGS)


def _users(task):
    return [u for u in task.users if u.id in USERS]


def test_the_benchmark_and_the_service_make_the_same_module(make_base, tmp_path):
    """The benchmark's per-user LoRA and the users service's training of the same users' same items, with
    the same settings, store bit-identical modules: both go through ``train_personal``."""
    task = load_task("verbagg")
    deps = _deps(task, make_base, tmp_path)
    PersonalSetup(PERSONAL_KINDS["lora"]).prepare(deps, "peft-lora", Recipe(), _users(task))
    bench = deps.store("peft-lora")

    service = UserService(tmp_path / "store", load_base=make_base, method_settings=SETTINGS)
    try:
        service.import_task("verbagg", users=USERS)
        assert sorted(service.train().trained) == USERS
        for user in USERS:
            mine, theirs = bench.get(user).tensors, service.store.get(user).tensors
            assert mine.keys() == theirs.keys()
            for name, tensor in mine.items():
                assert torch.equal(tensor, theirs[name]), (user, name)
    finally:
        service.close()


def test_a_part_is_made_as_its_kind_declares_and_progress_counts_its_unit(make_base, tmp_path):
    """A LoRA part is trained by the loss (progress in optimizer steps); a label bias is fitted against the
    frozen shared model (progress in users). Each stored user is heard once, in the order stored."""
    task = load_task("verbagg")
    deps = _deps(task, make_base, tmp_path)
    users = _users(task)
    lora, bias = PERSONAL_KINDS["lora"].spec, LabelBiasSpec(tuple(task.labels))
    config = personal_config(SETTINGS, kinds.of(lora).learning_rate)
    steps = sum(config.steps(len(task.training_examples(user))) for user in users)
    for spec, made_by, units in ((lora, "loss", steps), (bias, "label-fit", len(users))):
        assert kinds.of(spec).made_by == made_by
        assert work_units(spec, task, users, config) == units
        engine = deps.engine(spec, slots=3)
        store = ModuleStore(tmp_path / made_by)
        heard, progress = [], []
        training = PersonalTraining(f"peft-{spec.kind}", deps.builder(Recipe(), engine.tokenizer), config)
        stored = train_personal(
            deps,
            engine,
            store,
            users,
            training,
            functools.partial(_append, progress),
            heard.append,
        )
        assert sorted(stored) == USERS and heard == stored
        assert all(store.get(user).spec == spec for user in USERS)
        assert progress[-1] == (units, units)


def _append(seen: list, done: int, total: int) -> None:
    seen.append((done, total))


def test_a_way_of_making_a_part_that_nothing_knows_is_refused(make_base, tmp_path, monkeypatch):
    task = load_task("verbagg")
    deps = _deps(task, make_base, tmp_path)
    monkeypatch.setattr(LabelBias, "made_by", "telepathy")
    engine = deps.engine(LabelBiasSpec(tuple(task.labels)), slots=2)
    training = PersonalTraining("x", deps.builder(Recipe(), engine.tokenizer))
    with pytest.raises(ValueError, match="made by 'telepathy'"):
        train_personal(deps, engine, ModuleStore(tmp_path / "s"), _users(task), training)
    assert not (tmp_path / "s").exists() or not ModuleStore(tmp_path / "s").users()


def test_no_generic_code_names_a_kind():
    """Outside ``kinds/``, no code compares a spec's kind with a kind's name: what a kind is, and how its
    part is made, is asked of the kind (``made_by``, ``acts_on_model``)."""
    names = "|".join(re.escape(name) for name in kinds.KINDS)
    branch = re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    found = []
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC)
        if "kinds" in relative.parts or relative.as_posix() in NAMES_A_KIND:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if branch.search(line):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_a_method_whose_users_diverge_fails_naming_them(make_base, tmp_path):
    # At 1e9 each LoRA weight leaves fp16's range in one step: no such module is stored, and the method
    # fails with one line instead of answering from NaN scores.
    task = load_task("verbagg")
    deps = _deps(task, make_base, tmp_path)
    setup = PersonalSetup(ModuleRecipe(kinds.default_spec("lora"), learning_rate=1e9))
    with pytest.raises(ValueError, match=r"training of 3 users diverged .*: 1, 2, 3\); the others"):
        setup.prepare(deps, "peft-lora", Recipe(), _users(task))
    assert deps.store("peft-lora").users() == []
