"""Resumable training jobs: a killed job restarts where it stopped, without retraining finished users."""

from __future__ import annotations

import pytest
import torch

from kind_helpers import make_user
from tailorlm.store import module_folder
from tailorlm.store.store import ModuleStore
from tailorlm.train.jobs import TrainWork, train_group, train_job
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


def test_a_user_whose_module_comes_out_non_finite_is_not_stored_and_the_others_are(make_engine, tmp_path):
    # u2 starts from a module beyond fp16's range (as a diverged training ends): stored in fp16 it would
    # be inf. The store refuses it; u1 and u3, in the same steps, are stored as if u2 were not there.
    engine = make_engine("lora", slots=4)
    huge = {name: torch.full_like(t[0], 7e4) for name, t in engine.bank.tensors.items()}
    users = [make_user("u1", 3), make_user("u2", 3), make_user("u3", 3)]
    users[1].init = huge
    config = TrainConfig(epochs=1, batch_size=2, learning_rate=1e-6, users_per_step=3)
    store = ModuleStore(tmp_path)
    heard: list[str] = []
    trained = train_group(engine, store, TrainWork(config, users), users, on_stored=heard.append)
    assert trained == heard == ["u1", "u3"]
    assert not store.has("u2") and store.current("u2") is None
    alone = ModuleStore(tmp_path / "alone")
    train_job(make_engine("lora", slots=4), [users[0], users[2]], config, alone)
    for user in ("u1", "u3"):
        for name, tensor in alone.get(user).tensors.items():
            torch.testing.assert_close(store.get(user).tensors[name], tensor, atol=2e-3, rtol=0)


def test_a_retried_group_reports_the_users_its_earlier_try_stored(make_engine, tmp_path):
    # A Ray task retried after its worker died: the dead try's stored users are not trained again, and
    # the retry reports them, so the caller hears of every user the job stored.
    users = [make_user(name, 2) for name in ("u1", "u2")]
    work = TrainWork(TrainConfig(epochs=1, batch_size=2, learning_rate=1e-2), users)
    store = ModuleStore(tmp_path)
    assert train_group(make_engine("lora", slots=3), store, work, users[:1]) == ["u1"]
    stamp = store.current("u1").version
    assert train_group(make_engine("lora", slots=3), store, work, users) == ["u1", "u2"]
    assert store.current("u1").version == stamp
