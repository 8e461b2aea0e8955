"""A store's files are its owner's alone whatever the umask: the index (with its -wal and -shm), the
module files and folders, the profiles and the store's own records hold users' history and keys."""

from __future__ import annotations

import os
import stat

import pytest

from tailorlm.store.index import INDEX_FILE
from tailorlm.train.trainer import TrainConfig
from tailorlm.users.service import UserService

CONFIG = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-2, users_per_step=2)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def open_to_others(root) -> list[str]:
    """Every path under ``root`` (and ``root``) that a group or other user could read, write or enter."""
    paths = [root, *root.rglob("*")]
    return [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths if p.stat().st_mode & 0o077]


def test_a_new_store_is_owner_only_under_umask_022(umask_022, tmp_path, make_base):
    probe = tmp_path / "probe"
    probe.write_text("x")
    assert probe.stat().st_mode & 0o077, "the umask should make a plain file readable by others"
    service = UserService(tmp_path / "deep" / "store", load_base=make_base)
    try:
        service.import_task("verbagg", users=["1", "2"])
        service.train(config=CONFIG)
        service.issue_key("1")
        assert service.profile("1") is not None
        assert all((service.root / f"{INDEX_FILE}{end}").is_file() for end in ("", "-wal", "-shm"))
        assert list(service.root.glob("u-*/v*/adapter_model.safetensors"))
        assert open_to_others(tmp_path / "deep") == []
    finally:
        service.close()


def test_an_index_an_older_version_left_readable_is_narrowed_on_open(umask_022, tmp_path):
    service = UserService(tmp_path / "store")
    service.add("ann")
    service.close()
    index = tmp_path / "store" / INDEX_FILE
    os.chmod(index, 0o644)
    os.chmod(tmp_path / "store", 0o755)
    reopened = UserService(tmp_path / "store")
    try:
        assert reopened.show("ann").user_id == "ann"
        assert index.stat().st_mode & 0o077 == 0
    finally:
        reopened.close()
