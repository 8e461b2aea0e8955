"""``--backend ray`` for training, on a local Ray instance: the same modules as the local backend to the
bit (same groups, same torch thread count) even when a worker dies mid-group and its group is retried; a
killed driver started again (from the command line) trains only who is missing; only users whose data
changed train again; the benchmark's and tuning's results equal the local backend's."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from tailorlm import models
from tailorlm.bench import runner as bench_runner
from tailorlm.bench.config import BenchConfig
from tailorlm.bench.tune import tune
from tailorlm.cli import app
from tailorlm.cluster.training import RayRunner
from tailorlm.store.index import HistoryRecord
from tailorlm.train.jobs import LocalRunner
from tailorlm.train.trainer import TrainConfig
from tailorlm.users.service import UserService

pytestmark = pytest.mark.xdist_group("ray")

USERS = ["1", "2", "3", "4"]
# One epoch of 5 steps per verbagg user, 2 users per step, 2 users per group: 2 groups, trained at once.
CONFIG = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-2, users_per_step=2)
GROUP = 2


class Killed(Exception):
    pass


def ray_runner(**options) -> RayRunner:
    # The local runner trains at this process's thread count; so must the workers, for equal bits.
    return RayRunner(GROUP, workers=2, threads=torch.get_num_threads(), **options)


def imported(root, make_base, runner) -> UserService:
    service = UserService(root, load_base=make_base, runner=runner)
    service.import_task("verbagg", users=USERS)
    return service


def modules(service: UserService) -> dict[str, dict[str, torch.Tensor]]:
    return {user: service.store.get(user).tensors for user in sorted(service.store.users())}


def test_ray_modules_equal_the_local_ones_bit_for_bit_after_a_worker_dies(ray_instance, tmp_path, make_base):
    local = imported(tmp_path / "local", make_base, LocalRunner(GROUP))
    assert sorted(local.train(config=CONFIG).trained) == USERS

    kill = ray_instance / "kill-a-worker"
    kill.touch()  # the first worker to take a training step removes it and exits
    remote = imported(tmp_path / "ray", make_base, ray_runner())
    progress, stored = [], []
    outcome = remote.train(
        config=CONFIG,
        on_progress=lambda done, total: progress.append((done, total)),
        on_user=lambda record: stored.append(record.user_id),
    )
    assert not kill.exists(), "no worker took the kill: the retry was not exercised"
    assert sorted(outcome.trained) == sorted(stored) == USERS
    assert progress[-1] == (20, 20) and all(total == 20 for _, total in progress)

    expected, got = modules(local), modules(remote)
    assert list(got) == USERS
    for user in USERS:
        assert expected[user].keys() == got[user].keys()
        assert all(torch.equal(expected[user][name], got[user][name]) for name in expected[user]), user
        record = remote.store.current(user)
        assert (record.version, record.data_fingerprint) == (1, remote.data_fingerprint(user))
        assert record.metrics == local.store.current(user).metrics
    assert remote.profile(USERS[0]) == local.profile(USERS[0])


def test_a_killed_driver_resumes_and_only_changed_users_train_again(ray_instance, tmp_path, make_base):
    service = imported(tmp_path / "store", make_base, RayRunner(GROUP, workers=1, threads=1))
    service.configure(base_model=models.TINY_MODEL)  # what the command line loads: the same tiny model

    def die(record):  # the driver dies when it hears of the first stored user: one group of two is done
        raise Killed

    with pytest.raises(Killed):
        service.train(config=CONFIG, on_user=die)
    first = sorted(service.store.users())
    assert len(first) == GROUP
    versions = {user: service.store.current(user).version for user in first}

    # Started again from the command line: only the users not stored yet train.
    args = ["users", "train", "--store", str(service.root), "--epochs", "1", "--users-per-step", "2"]
    args += ["--json", "--backend", "ray", "--workers", "1", "--group-users", str(GROUP)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert sorted(outcome["trained"]) == sorted(set(USERS) - set(first))
    assert outcome["skipped"] == {user: "up to date" for user in first}
    assert {user: service.store.current(user).version for user in first} == versions

    service.add_history("3", [HistoryRecord("3/later", "The bus was late again. I would shout.", "yes")])
    again = service.train(config=CONFIG)
    assert again.trained == ["3"]
    assert again.skipped == {user: "up to date" for user in USERS if user != "3"}
    assert service.store.current("3").data_fingerprint == service.data_fingerprint("3")


BENCH = BenchConfig(model=models.TINY_MODEL, test_users=3, adapter_users=2, epochs=1, users_per_step=2)


def table(results: dict) -> dict:
    """The results without timings: what a run measured of each method."""
    return {name: method["metrics"] for name, method in results["methods"].items()}


def test_bench_and_tune_results_equal_the_local_backend(ray_instance, tmp_path):
    threads = torch.get_num_threads()
    methods = ["peft-lora"]
    local = bench_runner.run("verbagg", tmp_path / "local", methods, BENCH, runner=LocalRunner(GROUP))
    remote = bench_runner.run(
        "verbagg", tmp_path / "ray", methods, BENCH, runner=RayRunner(GROUP, workers=2, threads=threads)
    )
    assert table(local)["peft-lora"] and table(remote) == table(local)

    config = dataclasses.replace(BENCH, test_users=2)
    tuned = [
        tune("verbagg", "peft-lora", [1e-2], users=2, epochs=1, config=config, runner=runner)
        for runner in (LocalRunner(GROUP), RayRunner(GROUP, workers=1, threads=threads))
    ]
    assert tuned[0]["candidates"] == tuned[1]["candidates"]
