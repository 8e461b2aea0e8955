"""Resumable training jobs: a killed job restarts where it stopped, without retraining finished users."""

from __future__ import annotations

import pytest

from kind_helpers import make_user
from tailorlm.store import module_folder
from tailorlm.store.store import ModuleStore
from tailorlm.train.jobs import train_job
from tailorlm.train.trainer import TrainConfig


class JobKilled(Exception):
    pass


def test_killed_job_resumes_without_retraining_finished_users(make_engine, tmp_path, monkeypatch):
    users = [make_user(name, 3) for name in ("u1", "u2", "u3", "u4")]
    config = TrainConfig(epochs=1, batch_size=2, learning_rate=1e-2, users_per_step=2)
    real_put = ModuleStore.put
    written: list[str] = []
    kills_left = [1]

    def put_then_die(self, user_id, *args, **kwargs):
        record = real_put(self, user_id, *args, **kwargs)
        written.append(user_id)
        if kills_left[0]:
            kills_left[0] -= 1
            raise JobKilled  # the job dies right after its first user was stored
        return record

    monkeypatch.setattr(ModuleStore, "put", put_then_die)
    store = ModuleStore(tmp_path)
    with pytest.raises(JobKilled):
        train_job(make_engine("lora", slots=3), users, config, store)
    first = written[0]
    first_file = store.folder(first) / module_folder.WEIGHTS_FILE
    stamp = first_file.stat().st_mtime_ns
    assert sum(store.has(u.user_id) for u in users) == 1

    written.clear()
    trained = train_job(make_engine("lora", slots=3), users, config, store)
    assert sorted(written) == sorted(u.user_id for u in users if u.user_id != first)
    assert sorted(trained) == sorted(written)
    assert first_file.stat().st_mtime_ns == stamp
    assert all(store.has(u.user_id) for u in users)
    assert sorted(store.users()) == sorted(u.user_id for u in users)
    assert train_job(make_engine("lora", slots=3), users, config, store) == []  # nothing left to do
    for user in users:
        meta = store.get(user.user_id).meta
        assert meta["user"] == user.user_id and meta["steps"] == 2 and meta["epochs_run"] == 1
