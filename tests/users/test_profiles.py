"""PAG for served users: training writes each user's profile from their whole history (with the plain base
model), it follows their history, and forgetting the user removes it."""

from __future__ import annotations

import json

import pytest

from tailorlm.store.index import HistoryRecord
from tailorlm.train.trainer import TrainConfig
from tailorlm.users.identity import legacy_cache_of
from tailorlm.users.service import PROFILE_FILE, UserService

CONFIG = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-2, users_per_step=2)


@pytest.fixture
def imported(tmp_path, make_base):
    service = UserService(tmp_path / "store", load_base=make_base)
    service.import_task("verbagg", users=["1", "2"])
    yield service
    service.close()


def test_training_writes_profiles_that_follow_the_history(imported):
    assert imported.profile("1") is None
    imported.train(config=CONFIG)
    first = imported.profile("1")
    assert (
        first is not None and first.user == "1" and isinstance(first.text, str)
    )  # the tiny model may say nothing
    history_ids = {r.item_id for r in imported.history("1") if r.split == "train"}
    assert set(first.items) <= history_ids and len(first.items) == min(10, len(history_ids))
    assert (imported.cache_folder("1") / PROFILE_FILE).is_file()

    imported.add_history(
        "1", [HistoryRecord(f"1/new-{i}", f"New event {i}. I would shout.", "yes") for i in range(30)]
    )
    imported.train(["1"], config=CONFIG)
    assert imported.profile("1").items != first.items  # written again from the grown history
    assert imported.profile("2") is not None


def test_forgetting_removes_the_profile(imported):
    imported.train(config=CONFIG)
    written = (imported.cache_folder("2") / PROFILE_FILE).read_bytes()
    imported.delete("2")
    assert imported.profile("2") is None
    assert not imported.cache_folder("2").exists()
    assert not any(written in p.read_bytes() for p in imported.root.rglob("*") if p.is_file())


def test_a_legacy_cache_folder_shared_by_two_ids_serves_neither_the_others_profile(imported):
    """Before hashed folder names, ``x!#~^@@`` and ``x!#é%)é`` shared one cache folder, so one's profile
    was served to the other. A profile left there is read only by the user it names, and forgetting
    the other user leaves it alone."""
    ann, bob = "x!#~^@@", "x!#\u00e9%)\u00e9"
    assert legacy_cache_of(ann) == legacy_cache_of(bob)
    for user_id in (ann, bob):
        imported.add(user_id)
    profile = {"user": ann, "text": "likes zebras", "items": ["a"]}
    imported.store.files.write_text(f"{legacy_cache_of(ann)}/{PROFILE_FILE}", json.dumps(profile))
    assert imported.profile(ann).text == "likes zebras" and imported.profile(bob) is None
    assert imported.delete(bob).cache is False
    assert imported.profile(ann).text == "likes zebras"
    assert imported.delete(ann).cache is True
    assert not imported.store.files.exists(legacy_cache_of(ann))
