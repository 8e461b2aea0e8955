"""Where a store lives beyond one machine: module files through fsspec (``memory://`` and ``file://``
roots), the index named once when the store is created and found again from the root alone (or
``TAILORLM_INDEX_URL``), no password on disk, a put of another process left alone, and one clear error
for a store opened with an index that is not its own. Each runs on both index backends where both apply."""

from __future__ import annotations

import json
import time
import uuid

import fsspec
import pytest
import torch

from kind_helpers import personalize
from tailorlm.store import module_folder
from tailorlm.store.index_backends import StoreLocationError
from tailorlm.store.location import INDEX_ENV, LOCATION_FILE
from tailorlm.store.store import ModuleStore, folder_name


@pytest.fixture
def engine(make_engine):
    engine = make_engine("lora", slots=4)
    personalize(engine, [1, 2, 3])
    return engine


@pytest.fixture(autouse=True)
def no_index_env(monkeypatch):
    monkeypatch.delenv(INDEX_ENV, raising=False)


def _put(store: ModuleStore, user_id: str, engine, slot: int):
    return store.put(
        user_id, engine.spec, engine.bank.read(slot), model=engine.model, base_name=engine.base.name
    )


def _first_tensor(store: ModuleStore, user_id: str, version: int | None = None) -> torch.Tensor:
    return next(iter(store.get(user_id, version).tensors.values()))


@pytest.fixture(params=["memory", "file"])
def url_root(request, tmp_path) -> str:
    """A store root that is a URL: fsspec's in-memory filesystem, or a local folder as ``file://``."""
    if request.param == "memory":
        return f"memory://tailorlm-test-{uuid.uuid4().hex[:8]}/store"
    return f"file://{tmp_path}/url-store"


def test_a_store_under_a_url_keeps_module_files_there(url_root, index_url, engine, tmp_path):
    index = index_url or f"{tmp_path}/index.sqlite3"  # a URL root has no SQLite file of its own
    store = ModuleStore(url_root, keep=2, index=index)
    fs, base = fsspec.core.url_to_fs(url_root)
    assert store.users() == [] and not fs.exists(base)  # asking creates nothing
    first = _put(store, "ann", engine, 1)
    _put(store, "ann", engine, 2)
    third = _put(store, "ann", engine, 3)
    _put(store, "a/b", engine, 1)
    assert sorted(store.users()) == ["a/b", "ann"] and store.has("ann")
    assert [v.version for v in store.versions("ann")] == [2, 3]
    assert not fs.exists(f"{base}/{first.folder}")  # pruned on the filesystem too
    assert fs.isfile(f"{base}/{third.folder}/{module_folder.WEIGHTS_FILE}")
    assert torch.equal(_first_tensor(store, "ann"), next(iter(engine.bank.read(3).values())).half())
    store.rollback("ann")
    assert torch.equal(_first_tensor(store, "ann"), next(iter(engine.bank.read(2).values())).half())
    store.close()

    reopened = ModuleStore(url_root)  # the root records its index: nothing to retype
    assert sorted(reopened.users()) == ["a/b", "ann"] and reopened.current("ann").version == 2
    reopened.delete("ann")
    assert not fs.exists(f"{base}/{folder_name('ann')}") and reopened.users() == ["a/b"]
    reopened.close()


def test_a_damaged_file_under_a_url_fails_its_checksum(url_root, engine, tmp_path):
    store = ModuleStore(url_root, index=f"{tmp_path}/index.sqlite3")
    record = _put(store, "ann", engine, 1)
    fs, base = fsspec.core.url_to_fs(url_root)
    weights = f"{base}/{record.folder}/{module_folder.WEIGHTS_FILE}"
    damaged = bytearray(fs.cat_file(weights))
    damaged[-1] ^= 0xFF
    fs.pipe_file(weights, bytes(damaged))
    with pytest.raises(
        module_folder.ModuleFileError,
        match=rf"{url_root}/{folder_name('ann')}/v.* does not match its checksum",
    ):
        store.get("ann")
    fs.rm(weights)
    assert not store.has("ann")
    with pytest.raises(module_folder.ModuleFileError, match="is missing"):
        store.get("ann")
    with pytest.raises(StoreLocationError, match="not a folder on this machine"):
        store.folder("ann")
    store.close()


def test_a_url_root_without_an_index_says_where_to_put_it():
    store = ModuleStore(f"memory://tailorlm-test-{uuid.uuid4().hex[:8]}")
    with pytest.raises(StoreLocationError, match=r"keeps its index in PostgreSQL .* give --index"):
        store.index.user_ids()
    with pytest.raises(StoreLocationError, match="cannot open a store at nosuchfs://x"):
        ModuleStore("nosuchfs://x")


def test_the_root_records_the_index_without_its_password(postgres, engine, tmp_path, monkeypatch):
    url = postgres.new_database()
    store = ModuleStore(tmp_path, index=url.replace("tailorlm@", "tailorlm:hunter2@"))
    _put(store, "ann", engine, 1)
    store.close()
    recorded = json.loads((tmp_path / LOCATION_FILE).read_text())
    assert recorded["index"] == url and len(recorded["store_id"]) == 32
    assert not any(b"hunter2" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert ModuleStore(tmp_path).current("ann").version == 1  # found from the root alone
    # The same database under another name (as another machine may reach it): the store id matches.
    monkeypatch.setenv(INDEX_ENV, url.replace("127.0.0.1", "localhost"))
    assert ModuleStore(tmp_path).current("ann").version == 1


def test_the_env_names_a_new_stores_index(postgres, engine, tmp_path, monkeypatch):
    url = postgres.new_database()
    monkeypatch.setenv(INDEX_ENV, url)
    _put(ModuleStore(tmp_path), "ann", engine, 1)
    monkeypatch.delenv(INDEX_ENV)
    assert not (tmp_path / "index.sqlite3").exists()
    assert ModuleStore(tmp_path).current("ann").version == 1


def test_a_store_opened_with_an_index_not_its_own_is_one_clear_error(postgres, engine, tmp_path):
    first, second = postgres.new_database(), postgres.new_database()
    _put(ModuleStore(tmp_path / "a", index=first), "ann", engine, 1)
    with pytest.raises(StoreLocationError, match=r"holds the index of no store, not of the store at .*/a"):
        ModuleStore(tmp_path / "a", index=second).current("ann")
    with pytest.raises(StoreLocationError, match=r"is already the index of the store at .*/a"):
        _put(ModuleStore(tmp_path / "b", index=first), "bob", engine, 1)
    _put(ModuleStore(tmp_path / "b", index=second), "bob", engine, 1)
    with pytest.raises(StoreLocationError, match=r"holds the index of the store at .*/b, not of .*/a"):
        ModuleStore(tmp_path / "a", index=second).users()
    _put(ModuleStore(tmp_path / "local"), "cy", engine, 1)  # the default: its own SQLite file
    with pytest.raises(StoreLocationError, match=r"has its index in .*/local/index\.sqlite3, not at"):
        ModuleStore(tmp_path / "local", index=first).users()
    (tmp_path / "a" / LOCATION_FILE).write_text("{}")
    with pytest.raises(StoreLocationError, match=r"\.store\.json is not a store's index record"):
        ModuleStore(tmp_path / "a").users()


def test_an_unrecorded_folder_is_left_alone_while_it_may_be_another_put(tmp_path, engine):
    store = ModuleStore(tmp_path)
    _put(store, "ann", engine, 1)
    home = store.user_folder("ann")
    recent = home / f"v{time.time_ns():x}-0000beef"  # another process's put, its row not written yet
    staging = home / f".v{time.time_ns():x}-0000cafe.x1y2"
    old = home / f"v{time.time_ns() - 2 * 3600 * 10**9:x}-0000dead"  # a put killed two hours ago
    for folder in (recent, staging, old):
        folder.mkdir()
    _put(store, "ann", engine, 2)
    left = {p.name for p in home.iterdir()}
    assert recent.name in left and staging.name in left and old.name not in left
    store.close()


def test_two_stores_of_the_same_relative_name_do_not_share_an_index(postgres, tmp_path, monkeypatch):
    url = postgres.new_database()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    ModuleStore("store", index=url).index.add_user("ann")
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(StoreLocationError, match=r"already the index of the store at .*/a/store"):
        ModuleStore("store", index=url).index.add_user("bob")
    assert ModuleStore(tmp_path / "a" / "store").index.user_ids() == ["ann"]
