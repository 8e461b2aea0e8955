"""ModuleStore: a user's module by id. Folder names that are safe and distinct, completeness, atomic
replacement, and a loader for SlotManager that refuses a module of another layout."""

from __future__ import annotations

import json
import shutil
import zlib

import pytest
import torch

from kind_helpers import personalize
from tailorlm.engine.slots import SlotManager
from tailorlm.store import module_folder
from tailorlm.store.store import COMPLETE, ModuleStore, folder_name


@pytest.fixture
def engine(make_engine):
    engine = make_engine("lora", slots=4)
    personalize(engine, [1, 2, 3])
    return engine


def _put(store: ModuleStore, user_id: str, engine, slot: int, **meta) -> None:
    store.put(
        user_id,
        engine.spec,
        engine.bank.read(slot),
        model=engine.model,
        base_name=engine.base.name,
        meta=meta,
    )


def test_put_has_get_users_delete(engine, tmp_path):
    store = ModuleStore(tmp_path / "modules")
    assert store.users() == [] and not store.has("ann")  # the root need not exist yet
    _put(store, "ann", engine, 1, epochs_run=2)
    _put(store, "bob", engine, 2)
    assert store.has("ann") and store.has("bob") and not store.has("cy")
    assert sorted(store.users()) == ["ann", "bob"]
    stored = store.get("ann")
    assert stored.spec == engine.spec
    assert stored.meta["user"] == "ann" and stored.meta["epochs_run"] == 2 and stored.meta[COMPLETE]
    for name, value in engine.bank.read(1).items():
        assert torch.equal(stored.tensors[name], value.half())  # fp16 at rest
    _put(store, "ann", engine, 3)  # replaced whole
    assert torch.equal(
        next(iter(store.get("ann").tensors.values())), next(iter(engine.bank.read(3).values())).half()
    )
    store.delete("ann")
    store.delete("nobody")  # nothing to delete is not an error
    assert not store.has("ann") and store.users() == ["bob"]
    with pytest.raises(module_folder.ModuleFileError, match="no complete module is stored for user 'ann'"):
        store.get("ann")


def test_the_recorded_user_is_the_id_it_was_put_under(engine, tmp_path):
    store = ModuleStore(tmp_path)
    _put(store, "ann", engine, 1, user="someone else")
    assert store.users() == ["ann"] and store.get("ann").meta["user"] == "ann"


@pytest.mark.parametrize(
    "user_ids",
    [
        ["../etc", "..", ".", "etc"],
        ["a/b", "a_b", "a\\b", "a b"],
        [".hidden", "hidden", "..hidden"],
        ["", "-00000000"],
        ["x" * 100, "x" * 80, "x" * 99 + "y"],
    ],
)
def test_folder_names_are_safe_and_distinct(user_ids, engine, tmp_path):
    names = [folder_name(u) for u in user_ids]
    assert len(set(names)) == len(names), names
    store = ModuleStore(tmp_path / "root")
    for user_id in user_ids:
        folder = store.folder(user_id)
        assert folder.parent == store.root and not folder.name.startswith(".") and folder.name
        assert len(folder.name) <= 90
        _put(store, user_id, engine, 1)
    assert sorted(store.users()) == sorted(user_ids)
    assert not (tmp_path / "etc").exists()
    for user_id in user_ids:
        store.delete(user_id)
    assert store.root.is_dir() and store.users() == []


def test_plain_ids_keep_their_own_name_and_a_hashed_lookalike_does_not_collide():
    assert folder_name("user_17.a-b") == "user_17.a-b"
    hashed = folder_name("a/b")
    assert hashed == f"a_b-{zlib.crc32(b'a/b'):08x}"
    assert folder_name(hashed) != hashed  # an id spelled like a hashed name gets a hash of its own


def test_an_incomplete_folder_is_not_a_module(engine, tmp_path):
    store = ModuleStore(tmp_path)
    _put(store, "ann", engine, 1)
    meta_file = store.folder("ann") / module_folder.META_FILE
    meta = json.loads(meta_file.read_text())
    del meta[COMPLETE]
    meta_file.write_text(json.dumps(meta))
    assert not store.has("ann") and store.users() == []
    with pytest.raises(module_folder.ModuleFileError, match="no complete module"):
        store.get("ann")
    meta_file.write_text("{half a reco")
    assert not store.has("ann") and store.users() == []
    meta_file.unlink()
    assert not store.has("ann")
    # A module written straight to the folder (not through put) is not marked complete either.
    module_folder.save_module(engine, 1, store.folder("bob"))
    assert not store.has("bob")


def test_a_staging_folder_left_by_a_kill_is_not_a_user(engine, tmp_path):
    store = ModuleStore(tmp_path)
    _put(store, "ann", engine, 1)
    # A job killed between writing a complete module into its staging folder and renaming it leaves
    # ".ann.<random>/" behind, complete flag and all.
    shutil.copytree(store.folder("ann"), tmp_path / ".ann.k1ll3d")
    shutil.copytree(store.folder("ann"), tmp_path / ".bob.k1ll3d")
    assert store.users() == ["ann"] and not store.has("bob")


def test_the_loader_feeds_a_slot_manager(engine, make_engine, tmp_path):
    store = ModuleStore(tmp_path)
    _put(store, "ann", engine, 1)
    _put(store, "bob", engine, 2)
    other = make_engine("lora", slots=3)
    manager = SlotManager(other.bank, loader=store.loader(other.spec))
    placed = manager.acquire(["ann", "bob"])
    for user, slot in (("ann", 1), ("bob", 2)):
        for name, value in other.bank.read(placed[user]).items():
            assert torch.equal(value, engine.bank.read(slot)[name].half().float())
    with pytest.raises(module_folder.ModuleFileError, match="no complete module is stored for user 'cy'"):
        manager.acquire(["cy"])


def test_the_loader_refuses_a_module_of_another_layout_naming_its_folder(engine, make_engine, tmp_path):
    store = ModuleStore(tmp_path)
    _put(store, "ann", engine, 1)
    ia3 = make_engine("ia3", slots=2)
    load = store.loader(ia3.spec)
    with pytest.raises(module_folder.ModuleFileError, match="this bank holds") as error:
        load("ann")
    assert str(store.folder("ann")) in str(error.value)
