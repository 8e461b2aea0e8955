"""Collaborative tokens: fold-in is the ridge solution it says, a run keeps to the visibility rules, and
the shared MLP is trained, kept and reused on resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_blend import Heard
from test_methods_leakage import SMALL, Run, check_prompts_show_only_what_the_asker_may_see

from tailorlm.bench import runner
from tailorlm.bench.config import split_users
from tailorlm.data import load_task
from tailorlm.kinds.collab import VECTOR, CollabSpec
from tailorlm.methods import blend_part, registry
from tailorlm.methods.collab import (
    ITEMS_FILE,
    PART_FILE,
    SHARED_FILE,
    SHARED_FOLDER,
    CollabPart,
    CollabPartError,
    ItemFactors,
    answers_of,
)
from tailorlm.methods.recipes import PromptUse
from tailorlm.store.store import ModuleStore


def items(size: int = 3) -> ItemFactors:
    generator = torch.Generator().manual_seed(0)
    factors = {f"i{k}": torch.randn(size, generator=generator, dtype=torch.float64) for k in range(6)}
    return ItemFactors(2.0, {f"i{k}": 0.1 * k for k in range(6)}, factors, size, penalty=0.5)


def test_fold_in_is_the_ridge_solution_and_recovers_a_user_without_noise():
    found = items()
    truth = torch.tensor([0.4, 1.0, -0.5, 0.25])
    answers = [(item, found.predict(truth, item)) for item in found.factors]
    vector = found.fold_in(answers, penalty=1e-9)
    torch.testing.assert_close(vector, truth, atol=1e-5, rtol=0)
    # With a penalty: the normal equations hold (gradient of the ridge objective is zero).
    vector = found.fold_in(answers).double()
    x = torch.stack([torch.cat([torch.ones(1, dtype=torch.float64), q]) for q in found.factors.values()])
    y = torch.tensor([r - found.mean - found.bias[i] for i, r in answers], dtype=torch.float64)
    gradient = x.T @ (x @ vector - y) + found.penalty * vector
    assert gradient.abs().max() < 1e-5


def mlp() -> dict[str, torch.Tensor]:
    """A collab MLP's tensors for 3 factors, 5 hidden units and 2 tokens of width 8."""
    return {
        "collab_in.weight": torch.randn(5, 4),
        "collab_in.bias": torch.zeros(5),
        "collab_out.weight": torch.randn(16, 5),
        "collab_out.bias": torch.zeros(16),
    }


def test_a_part_is_saved_and_loaded_whole(tmp_path):
    found = items()
    shared = mlp()
    CollabPart(CollabSpec(factors=3), shared, found, "abc").save(tmp_path / "part")
    loaded = CollabPart.load(tmp_path / "part")
    assert loaded.spec == CollabSpec(factors=3) and loaded.task_adapter == "abc"
    assert all(torch.equal(loaded.shared[k], shared[k]) for k in shared)
    assert (loaded.items.mean, loaded.items.penalty, loaded.items.size) == (2.0, 0.5, 3)
    assert loaded.items.bias == found.bias
    assert all(torch.equal(loaded.items.factors[k], found.factors[k]) for k in found.factors)


def _edit_meta(**changes):
    def edit(folder):
        meta = json.loads((folder / PART_FILE).read_text())
        meta.update(changes)
        (folder / PART_FILE).write_text(json.dumps(meta))

    return edit


def _edit_tensors(file, change):
    def edit(folder):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / file))
        change(tensors)
        save_file(tensors, str(folder / file))

    return edit


# What a damaged or hand-made part may hold, and the words of the error that names it. Each would have
# folded users in as NaN, against no item or the wrong ones, or served NaN tokens to every collab user.
BAD_PARTS = {
    "nan-mean": (lambda f: (f / PART_FILE).write_text(
        (f / PART_FILE).read_text().replace('"mean": 2.0', '"mean": NaN')), "mean must be a finite number"),
    "inf-penalty": (_edit_meta(penalty=float("inf")), "penalty must be a finite number"),
    "zero-penalty": (_edit_meta(penalty=0), "penalty must be above 0"),
    "bool-mean": (_edit_meta(mean=True), "mean must be a finite number"),
    "int-items": (_edit_meta(items=list(range(6))), "items must be a list of item keys"),
    "text-items": (_edit_meta(items="i0i1i2"), "items must be a list of item keys"),
    "twice": (_edit_meta(items=["i0", "i0", "i1", "i2", "i3", "i4"]), "appears more than once"),
    "not-object": (lambda f: (f / PART_FILE).write_text("[1, 2]"), "not an object with spec"),
    "adapter-int": (_edit_meta(task_adapter=7), "task_adapter must be a fingerprint"),
    "nan-factors": (_edit_tensors(ITEMS_FILE, lambda t: t["factors"].view(-1).__setitem__(0, float("nan"))),
                    "factors must hold finite"),
    "int-bias": (_edit_tensors(ITEMS_FILE, lambda t: t.__setitem__("bias", t["bias"].long())),
                 "bias must hold finite floating-point"),
    "inf-mlp": (_edit_tensors(SHARED_FILE, lambda t: t["collab_out.bias"].fill_(float("inf"))),
                "collab_out.bias must hold finite"),
    "extra-mlp": (_edit_tensors(SHARED_FILE, lambda t: t.__setitem__("other", torch.zeros(1))),
                  "a collab part holds"),
    "missing-mlp": (_edit_tensors(SHARED_FILE, lambda t: t.pop("collab_in.bias")), "a collab part holds"),
}  # fmt: skip


@pytest.mark.parametrize("bad", sorted(BAD_PARTS))
def test_a_part_that_would_fold_in_or_serve_wrong_numbers_is_refused_naming_why(tmp_path, bad):
    CollabPart(CollabSpec(factors=3), mlp(), items(), "abc").save(tmp_path / "part")
    CollabPart.load(tmp_path / "part")
    edit, words = BAD_PARTS[bad]
    edit(tmp_path / "part")
    with pytest.raises(CollabPartError, match=words):
        CollabPart.load(tmp_path / "part")


def test_a_user_with_no_known_item_is_the_average_user_and_unknown_items_are_skipped():
    found = items()
    assert found.fold_in([]).tolist() == [0.0] * 4
    assert found.fold_in([("never-answered", 5.0)]).tolist() == [0.0] * 4
    known = [("i1", 3.0), ("i2", 1.0)]
    torch.testing.assert_close(found.fold_in([*known, ("never-answered", 5.0)]), found.fold_in(known))
    # The estimate for an item nobody answered is the mean plus the user's bias.
    assert found.predict(torch.tensor([0.5, 9.0, 9.0, 9.0]), "never-answered") == pytest.approx(2.5)


def test_the_factors_are_fitted_on_training_answers_and_the_penalty_chosen_on_validation():
    task = load_task("bfi", seed=0)
    users = list(task.users)[:40]
    found = ItemFactors.fit(task, 4, seed=0)
    assert found.size == 4 and len(found.factors) == 25  # bfi's 25 statements
    assert all(v.shape == (4,) for v in found.factors.values())
    chosen = found.with_penalty(task, users)
    assert chosen.penalty in (0.3, 1.0, 3.0, 10.0, 30.0)

    # The chosen penalty's validation error is the lowest of the grid.
    def error(penalty: float) -> float:
        rows = [
            abs(found.predict(found.fold_in(answers_of(task, u), penalty), i) - r)
            for u in users
            for i, r in answers_of(task, u, "val")
        ]
        return sum(rows) / len(rows)

    assert error(chosen.penalty) == min(error(p) for p in (0.3, 1.0, 3.0, 10.0, 30.0))


def test_collab_applies_to_ordered_labels_on_shared_items_only():
    assert {"collab", "blend-collab"} <= set(registry.methods_for(load_task("bfi")))
    assert "collab" not in registry.methods_for(load_task("tate"))  # generation
    assert "peft-collab" not in registry.methods_for(load_task("bfi"))  # not trained by the loss


def test_a_collab_run_keeps_to_the_rules_stores_small_modules_and_resumes(tmp_path):
    uses: list[PromptUse] = []
    heard = Heard()
    # So few adapter examples that the MLP's sample leaves some of the adapter's users out: the blend
    # still scores their validation answers, so they need vectors too.
    config = dataclasses.replace(SMALL, adapter_examples=3)
    runner.run("bfi", tmp_path, ["collab", "blend-collab"], config, trace=uses.append, reporter=heard)
    run = Run(tmp_path, load_task("bfi", seed=SMALL.seed), uses)
    check_prompts_show_only_what_the_asker_may_see(run)
    for method in ("collab", "blend-collab"):
        record = [
            json.loads(x) for x in (tmp_path / "predictions" / f"{method}.jsonl").read_text().splitlines()
        ]
        assert {r["user"] for r in record} == run.test_ids
    store = ModuleStore(tmp_path / "modules" / "collab-plain")
    _, adapter = split_users(load_task("bfi", seed=SMALL.seed), config)
    assert run.test_ids | {u.id for u in adapter} <= set(store.users())
    for user in run.test_ids:
        module = store.get(user).tensors
        assert set(module) == {VECTOR} and module[VECTOR].numel() * 4 <= 1024
    folder = tmp_path / "modules" / SHARED_FOLDER.format(tag="plain")
    assert all((folder / name).is_file() for name in (SHARED_FILE, ITEMS_FILE, PART_FILE))
    assert any("shared MLP epoch" in line for line in heard.lines)
    # blend-collab reused the stored vectors and the trained MLP: nothing folded in or trained again.
    lines = [line for line in heard.lines if line.startswith("blend-collab:")]
    assert any("every user's vector is stored already" in line for line in lines)
    assert not any("folded in" in line for line in lines)
    assert not any("shared MLP epoch" in line for line in lines)
    assert any("model" in line for line in lines if "blended on" in line)
    # Served, the blend asks each user's own collab module for its model source.
    assert blend_part.BlendPart.load(tmp_path / "modules" / "blend-collab-part-plain").model == "module"


def test_every_adapter_user_gets_a_vector_beyond_the_mlps_capped_sample(tmp_path):
    """The blend scores every adapter user's validation answers through collab, so each needs a vector,
    also those the MLP's capped sample of examples left out."""
    from tailorlm.methods.collab import CollabSetup
    from tailorlm.methods.deps import MethodDeps, MethodSettings, base_loader
    from tailorlm.methods.recipes import Recipe
    from tailorlm.methods.setups import TaskAdapterSetup

    task = load_task("bfi", seed=0)
    users = list(task.users)
    test, adapter = users[:2], users[2:8]
    settings = MethodSettings(adapter_examples=2, adapter_val_examples=1, adapter_batch_size=2)
    deps = MethodDeps(task, base_loader("tiny"), tmp_path, settings, adapter_users=adapter)
    train, val = TaskAdapterSetup.pooled(deps)
    assert {u.id for u, _ in (*train, *val)} < {u.id for u in adapter}  # the sample leaves some out
    CollabSetup().answerer(deps, "collab", Recipe(), test)
    assert {u.id for u in (*test, *adapter)} <= set(ModuleStore(tmp_path / "collab-plain").users())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([f"i{k}" for k in range(6)] + ["unknown"]), st.floats(0, 5)),
        max_size=12,
    ),
    st.floats(1e-6, 1e6),
)
def test_fold_in_solves_its_normal_equations_for_any_answers_and_penalty(answers, penalty):
    """Any answers (repeated items, unknown ones, none) and any penalty from tiny to huge: a finite vector
    at which the ridge objective's gradient vanishes (relative to its scale)."""
    found = items()
    vector = found.fold_in(answers, penalty).double()
    assert torch.isfinite(vector).all()
    known = [(i, r) for i, r in answers if i in found.factors]
    if not known:
        assert not vector.any()
        return
    x = torch.stack([torch.cat([torch.ones(1, dtype=torch.float64), found.factors[i]]) for i, _ in known])
    y = torch.tensor([r - found.mean - found.bias[i] for i, r in known], dtype=torch.float64)
    gradient = x.T @ (x @ vector - y) + penalty * vector
    scale = (x.T @ y).abs().max() + penalty * vector.abs().max() + 1.0
    assert gradient.abs().max() / scale < 1e-4
