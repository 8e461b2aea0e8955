"""Without Ray: a clear one-line error naming the extra when Ray is missing, an unknown backend refused,
and the replica each user is routed to (rendezvous hashing) stable and moving only the users a new
replica wins."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from tailorlm.cli import app
from tailorlm.cluster import session
from tailorlm.cluster.serving import home_replica, replica_names

INSTALL = "pip install tailorlm[ray]"


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed


def test_a_missing_ray_is_one_line_naming_the_extra(no_ray, tmp_path):
    with pytest.raises(session.ClusterError, match=r"pip install tailorlm\[ray\]"):
        session.import_ray()
    cli = CliRunner()
    commands = [
        ["users", "train", "--store", str(tmp_path / "store"), "--backend", "ray"],
        ["tune", "peft-lora", "--backend", "ray"],
        ["bench", "--out", str(tmp_path / "run"), "--backend", "ray"],
        ["serve", "--store", str(tmp_path / "store"), "--backend", "ray", "--port", "1"],
    ]
    for command in commands:
        result = cli.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert INSTALL in result.output and "Traceback" not in result.output, command
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "store").exists() and not (tmp_path / "run").exists()


def test_an_unknown_backend_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["users", "train", "--store", str(tmp_path), "--backend", "spark"])
    assert result.exit_code == 2 and "unknown backend 'spark'" in result.output


def test_each_user_has_one_home_replica_and_a_new_replica_takes_only_its_own():
    users = [f"user-{i}" for i in range(400)]
    two, three = replica_names(2), replica_names(3)
    before = {user: home_replica(user, two) for user in users}
    assert before == {user: home_replica(user, list(reversed(two))) for user in users}  # order-free
    counts = [list(before.values()).count(name) for name in two]
    assert min(counts) > 150  # spread, not piled on one replica
    after = {user: home_replica(user, three) for user in users}
    moved = [user for user in users if after[user] != before[user]]
    assert moved and all(after[user] == three[2] for user in moved)  # only to the new replica
