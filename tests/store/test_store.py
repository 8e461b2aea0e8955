"""ModuleStore: a user's module by id, with its index on both backends (the root's own SQLite file, and
a real PostgreSQL server). Folder names that are safe and distinct, versions with rollback and pruning,
checksums, what a killed put leaves, forgetting, and a loader for SlotManager that refuses a module of
another layout."""

from __future__ import annotations

import hashlib
import shutil
import zlib

import pytest
import torch

from kind_helpers import personalize
from tailorlm.engine.slots import SlotManager
from tailorlm.store import module_folder
from tailorlm.store import store as store_module
from tailorlm.store.index import INDEX_FILE
from tailorlm.store.location import LOCATION_FILE
from tailorlm.store.store import ModuleStore, folder_name, legacy_folder_name


@pytest.fixture
def engine(make_engine):
    engine = make_engine("lora", slots=4)
    personalize(engine, [1, 2, 3])
    return engine


def index_record(root, index_url):
    """The file in the root that says where the index is: the index itself, or the record naming it."""
    return root / (INDEX_FILE if index_url is None else LOCATION_FILE)


def _put(store: ModuleStore, user_id: str, engine, slot: int, **meta):
    return store.put(
        user_id,
        engine.spec,
        engine.bank.read(slot),
        model=engine.model,
        base_name=engine.base.name,
        meta=meta,
    )


def test_put_has_get_users_delete(index_url, engine, tmp_path):
    store = ModuleStore(tmp_path / "modules", index=index_url)
    assert store.users() == [] and not store.has("ann")  # the root need not exist yet
    _put(store, "ann", engine, 1, epochs_run=2)
    _put(store, "bob", engine, 2)
    assert store.has("ann") and store.has("bob") and not store.has("cy")
    assert sorted(store.users()) == ["ann", "bob"]
    stored = store.get("ann")
    assert stored.spec == engine.spec
    assert stored.meta["user"] == "ann" and stored.meta["epochs_run"] == 2
    for name, value in engine.bank.read(1).items():
        assert torch.equal(stored.tensors[name], value.half())  # fp16 at rest
    _put(store, "ann", engine, 3)  # a new version, served from now on
    assert torch.equal(
        next(iter(store.get("ann").tensors.values())), next(iter(engine.bank.read(3).values())).half()
    )
    store.delete("ann")
    store.delete("nobody")  # nothing to delete is not an error
    assert not store.has("ann") and store.users() == ["bob"]
    with pytest.raises(module_folder.ModuleFileError, match="no module is stored for user 'ann'"):
        store.get("ann")


def test_the_recorded_user_is_the_id_it_was_put_under(index_url, engine, tmp_path):
    store = ModuleStore(tmp_path, index=index_url)
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
def test_folder_names_are_safe_and_distinct(index_url, user_ids, engine, tmp_path):
    names = [folder_name(u) for u in user_ids]
    assert len(set(names)) == len(names), names
    store = ModuleStore(tmp_path / "root", index=index_url)
    for user_id in user_ids:
        folder = store.user_folder(user_id)
        assert folder.parent == store.root and not folder.name.startswith(".") and folder.name
        assert len(folder.name) <= 90
        _put(store, user_id, engine, 1)
        assert store.folder(user_id).parent == folder
    assert sorted(store.users()) == sorted(user_ids)
    assert not (tmp_path / "etc").exists()
    for user_id in user_ids:
        store.delete(user_id)
    assert store.root.is_dir() and store.users() == []


def test_a_folder_name_is_the_full_sha256_of_the_id():
    name = folder_name("user_17.a-b")
    assert name == "u-" + hashlib.sha256(b"user_17.a-b").hexdigest()
    assert folder_name(name) != name  # an id spelled like a folder name gets a folder of its own


# Ids that shared a folder under the old naming (cleaned, cut to 80 characters, 32-bit checksum).
LEGACY_TWINS = ("x!#~^@@", "x!#\u00e9%)\u00e9")


def test_the_old_naming_really_merged_these_ids():
    assert legacy_folder_name(LEGACY_TWINS[0]) == legacy_folder_name(LEGACY_TWINS[1])
    assert zlib.crc32(LEGACY_TWINS[0].encode()) == zlib.crc32(LEGACY_TWINS[1].encode())


@pytest.mark.parametrize(
    "user_ids",
    [
        LEGACY_TWINS,
        ("Ann", "ann", "ANN"),  # a case-insensitive filesystem would merge names that differ by case
        ("caf\u00e9", "cafe\u0301"),  # NFC and NFD spellings: two ids, two users
        ("p" * 127 + "a", "p" * 127 + "b"),  # differ after any prefix the old naming kept
    ],
)
def test_ids_the_old_naming_could_merge_get_two_folders_and_delete_apart(
    index_url, user_ids, engine, tmp_path
):
    store = ModuleStore(tmp_path / "root", index=index_url)
    for slot, user_id in enumerate(user_ids, start=1):
        _put(store, user_id, engine, slot)
    assert len({store.user_folder(u) for u in user_ids}) == len(user_ids)
    survivors = user_ids[1:]
    before = {u: store.get(u).tensors for u in survivors}
    store.delete(user_ids[0])
    assert not store.has(user_ids[0]) and sorted(store.users()) == sorted(survivors)
    for user_id in survivors:  # whole: every file there, and its checksum holds
        assert all(torch.equal(t, before[user_id][k]) for k, t in store.get(user_id).tensors.items())


def _legacy_put(store, user_id, engine, slot, monkeypatch):
    """A version written where a store made before hashed folder names put it."""
    with monkeypatch.context() as patched:
        patched.setattr(store_module, "folder_name", legacy_folder_name)
        return _put(store, user_id, engine, slot)


def test_a_store_written_with_the_old_naming_keeps_working(index_url, engine, tmp_path, monkeypatch):
    store = ModuleStore(tmp_path / "root", index=index_url)
    ann, bob = LEGACY_TWINS
    for slot, user_id in enumerate(LEGACY_TWINS, start=1):
        _legacy_put(store, user_id, engine, slot, monkeypatch)
    shared = store.root / legacy_folder_name(ann)
    assert len(list(shared.iterdir())) == 2  # both users' versions in one folder, as the old code left them
    store.close()

    reopened = ModuleStore(tmp_path / "root", index=index_url)
    assert reopened.get(ann).meta["user"] == ann and reopened.get(bob).meta["user"] == bob
    record = _put(reopened, ann, engine, 3)  # a new version goes to the hashed folder
    assert record.folder.startswith(folder_name(ann) + "/") and reopened.versions(ann)[0].folder.startswith(
        legacy_folder_name(ann) + "/"
    )
    reopened.rollback(ann)  # the old version is still read in place
    assert reopened.get(ann).meta["user"] == ann
    bob_tensors = reopened.get(bob).tensors
    reopened.delete(ann)
    assert not reopened.has(ann) and reopened.users() == [bob]
    assert shared.is_dir() and len(list(shared.iterdir())) == 1  # bob's version, left whole
    assert all(torch.equal(t, bob_tensors[k]) for k, t in reopened.get(bob).tensors.items())
    reopened.delete(bob)
    assert not shared.exists() and reopened.users() == []


@pytest.mark.parametrize("user_id", [INDEX_FILE, f"{INDEX_FILE}-wal", f"{INDEX_FILE}-shm", "INDEX.sqlite3"])
def test_ids_spelled_like_the_index_files_get_a_folder_of_their_own(index_url, user_id, engine, tmp_path):
    assert not folder_name(user_id).endswith(user_id)
    store = ModuleStore(tmp_path, index=index_url)
    _put(store, user_id, engine, 1)
    assert store.has(user_id) and index_record(tmp_path, index_url).is_file()
    store.delete(user_id)
    assert index_record(tmp_path, index_url).is_file() and store.users() == []


def test_versions_roll_back_and_old_ones_are_pruned(index_url, engine, tmp_path):
    store = ModuleStore(tmp_path, keep=2, index=index_url)
    first = _put(store, "ann", engine, 1)
    _put(store, "ann", engine, 2)
    third = _put(store, "ann", engine, 3)
    assert [v.version for v in store.versions("ann")] == [2, 3]  # the oldest was pruned
    assert not (tmp_path / first.folder).exists()
    assert len(list(store.user_folder("ann").iterdir())) == 2
    rolled = store.rollback("ann")
    assert rolled.version == 2 and store.current("ann").version == 2
    expected = next(iter(engine.bank.read(2).values())).half()
    assert torch.equal(next(iter(store.get("ann").tensors.values())), expected)
    assert store.get("ann", version=3).tensors.keys() == store.get("ann").tensors.keys()
    store.rollback("ann", third.version)
    assert store.current("ann").version == 3
    with pytest.raises(module_folder.ModuleFileError, match="no version 9 is stored"):
        store.get("ann", version=9)


def test_a_damaged_weights_file_is_named_with_user_and_version(index_url, engine, tmp_path):
    store = ModuleStore(tmp_path, index=index_url)
    _put(store, "ann", engine, 1)
    weights = store.folder("ann") / module_folder.WEIGHTS_FILE
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    with pytest.raises(module_folder.ModuleFileError, match=r"user 'ann' version 1: .* checksum"):
        store.get("ann")


def test_a_put_killed_before_its_index_row_leaves_the_old_version(index_url, engine, tmp_path):
    store = ModuleStore(tmp_path, index=index_url)
    _put(store, "ann", engine, 1)
    old = store.folder("ann")
    # A put killed after its folder was renamed in but before the index recorded it: a version folder
    # no row names, and a staging folder killed even earlier.
    shutil.copytree(old, store.user_folder("ann") / "v-killed")
    shutil.copytree(old, store.user_folder("ann") / ".v-killed.staging")
    shutil.copytree(old, tmp_path / "bob")  # a folder of a user the index never recorded
    assert store.current("ann").version == 1 and store.folder("ann") == old
    assert store.users() == ["ann"] and not store.has("bob")
    _put(store, "ann", engine, 2)  # the next put of that user removes what no row names
    assert sorted(p.name for p in store.user_folder("ann").iterdir()) == sorted(
        [old.name, store.folder("ann").name]
    )


def test_forgetting_removes_every_version_and_the_index_rows(index_url, engine, tmp_path):
    store = ModuleStore(tmp_path, index=index_url)
    _put(store, "ann", engine, 1)
    _put(store, "ann", engine, 2)
    _put(store, "bob", engine, 3)
    store.delete("ann")
    assert not store.user_folder("ann").exists() and store.versions("ann") == []
    assert store.users() == ["bob"] and index_record(tmp_path, index_url).is_file()


def test_an_empty_root_stays_empty_when_only_asked(index_url, tmp_path):
    store = ModuleStore(tmp_path / "nothing", index=index_url)
    assert store.users() == [] and not store.has("ann") and store.versions("ann") == []
    assert not (tmp_path / "nothing").exists()


def test_the_loader_feeds_a_slot_manager(index_url, engine, make_engine, tmp_path):
    store = ModuleStore(tmp_path, index=index_url)
    _put(store, "ann", engine, 1)
    _put(store, "bob", engine, 2)
    other = make_engine("lora", slots=3)
    manager = SlotManager(other.bank, loader=store.loader(other.spec))
    placed = manager.acquire(["ann", "bob"])
    for user, slot in (("ann", 1), ("bob", 2)):
        for name, value in other.bank.read(placed[user]).items():
            assert torch.equal(value, engine.bank.read(slot)[name].half().float())
    with pytest.raises(module_folder.ModuleFileError, match="no module is stored for user 'cy'"):
        manager.acquire(["cy"])


def test_the_loader_refuses_a_module_of_another_layout_naming_its_folder(
    index_url, engine, make_engine, tmp_path
):
    store = ModuleStore(tmp_path, index=index_url)
    _put(store, "ann", engine, 1)
    ia3 = make_engine("ia3", slots=2)
    load = store.loader(ia3.spec)
    with pytest.raises(module_folder.ModuleFileError, match="this bank holds") as error:
        load("ann")
    assert str(store.folder("ann")) in str(error.value)
