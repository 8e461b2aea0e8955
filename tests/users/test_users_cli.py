"""`tailorlm users ...`: the store's command line over the users service, on the tiny model. --json gives
one object; a mistake is one line and exit code 2, never a traceback; a killed `train` resumes."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
from typer.testing import CliRunner

from tailorlm.cli import app
from tailorlm.store.store import ModuleStore, folder_name
from tailorlm.users.identity import cache_of
from tailorlm.users.service import UserService

runner = CliRunner()


class Killed(Exception):
    pass


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


def _json(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _imported(store, users: str = "1,2,3") -> None:
    payload = _json("users", "import", "verbagg", "--users", users, "--model", "tiny", "--store", str(store))
    assert payload["task"] == "verbagg" and payload["users"] == users.split(",")


def test_import_list_train_show_key_delete(store):
    _imported(store, "1,2")
    listed = _json("users", "list", "--store", str(store))
    assert [(u["user"], u["history"], u["status"]) for u in listed["users"]] == [
        ("1", 22, "no module yet"),
        ("2", 22, "no module yet"),
    ]
    assert listed["settings"]["task"] == "verbagg" and listed["settings"]["base_model"] == "tiny"

    trained = _json("users", "train", "--epochs", "1", "--store", str(store))
    assert sorted(trained["trained"]) == ["1", "2"] and trained["skipped"] == {}
    again = _json("users", "train", "--epochs", "1", "--store", str(store))
    assert again["trained"] == [] and again["skipped"] == {"1": "up to date", "2": "up to date"}

    shown = _json("users", "show", "1", "--store", str(store))
    assert shown["current_version"] == 1 and shown["needs_training"] is None and shown["keys"] == 0
    version = shown["versions"][0]
    assert version["data_fingerprint"] == shown["data_fingerprint"] and len(version["sha256"]) == 64
    assert version["metrics"]["val_losses"]

    human = runner.invoke(app, ["users", "key", "issue", "1", "--store", str(store)])
    assert human.exit_code == 0, human.output
    key = human.stdout.strip()
    assert key.startswith("tlm-u-")
    service = UserService(store)
    assert service.resolve_key(key).user_id == "1"
    admin = _json("users", "key", "issue", "--admin", "--store", str(store))["key"]
    assert service.resolve_key(admin).role == "admin"
    assert _json("users", "show", "1", "--store", str(store))["keys"] == 1
    assert key not in json.dumps(_json("users", "show", "1", "--store", str(store)))
    assert _json("users", "key", "revoke", "1", "--store", str(store)) == {"revoked": 1}
    assert service.resolve_key(key) is None and service.resolve_key(admin) is not None
    assert _json("users", "key", "revoke", "--key", admin, "--store", str(store)) == {"revoked": 1}
    assert service.resolve_key(admin) is None

    gone = _json("users", "delete", "2", "--yes", "--store", str(store))
    assert (gone["user_id"], gone["versions"], gone["history"]) == ("2", [1], 22)
    assert [u["user"] for u in _json("users", "list", "--store", str(store))["users"]] == ["1"]
    service.close()


def test_delete_asks_first(store):
    _imported(store, "1")
    refused = runner.invoke(app, ["users", "delete", "1", "--store", str(store)], input="n\n")
    assert refused.exit_code != 0
    assert _json("users", "show", "1", "--store", str(store))["history"] == 22
    agreed = runner.invoke(app, ["users", "delete", "1", "--store", str(store)], input="y\n")
    assert agreed.exit_code == 0, agreed.output
    assert _json("users", "list", "--store", str(store))["users"] == []


def test_delete_waits_for_a_reader_then_says_the_index_is_compacted(store):
    """A reader holding the index (another process's read transaction) holds compaction up: the command
    retries for a while and reports the outcome; ``show`` then says the user was forgotten."""
    _imported(store, "1,2")
    reader = sqlite3.connect(store / "index.sqlite3", isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM history").fetchone()

    def release() -> None:
        time.sleep(1.0)
        reader.execute("COMMIT")

    releaser = threading.Thread(target=release)
    releaser.start()
    forgotten = _json("users", "delete", "1", "--yes", "--store", str(store))
    releaser.join()
    reader.close()
    assert forgotten["compacted"] is True and forgotten["compaction"] is None and forgotten["history"] == 22
    shown = runner.invoke(app, ["users", "show", "1", "--store", str(store)])
    assert shown.exit_code != 0 and "forgotten at" in shown.output and "compacted away" in shown.output
    assert "Traceback" not in shown.output


def test_a_killed_train_resumes(store, monkeypatch):
    _imported(store)
    real_put = ModuleStore.put
    stored: list[str] = []

    def put_then_die(self, user_id, *args, **kwargs):
        record = real_put(self, user_id, *args, **kwargs)
        stored.append(user_id)
        if len(stored) == 1:
            raise Killed  # the process dies right after its first user was stored
        return record

    monkeypatch.setattr(ModuleStore, "put", put_then_die)
    args = ["users", "train", "--epochs", "1", "--users-per-step", "1", "--store", str(store)]
    killed = runner.invoke(app, args)
    assert isinstance(killed.exception, Killed)
    resumed = _json(*args)
    assert sorted(resumed["trained"]) == sorted({"1", "2", "3"} - {stored[0]})
    assert resumed["skipped"] == {stored[0]: "up to date"}


def test_rollback_rolls_back(store):
    _imported(store, "1")
    _json("users", "train", "--epochs", "1", "--store", str(store))
    _json("users", "train", "--epochs", "1", "--all", "--store", str(store))
    assert _json("users", "show", "1", "--store", str(store))["current_version"] == 2
    assert _json("users", "rollback", "1", "--store", str(store))["version"] == 1
    assert _json("users", "show", "1", "--store", str(store))["current_version"] == 1


def test_the_default_store_comes_from_the_environment(store, monkeypatch):
    monkeypatch.setenv("TAILORLM_STORE", str(store))
    assert _json("users", "add", "ann", "--kind", "prompt")["kind"] == "prompt"
    assert [u["user"] for u in _json("users", "list")["users"]] == ["ann"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["list"], "no user store"),
        (["show", "ann"], "no user store"),
        (["train"], "no user store"),
        (["add", "a\x07b"], "control or unprintable"),
        (["add", " "], "whitespace"),
        (["add", "ann", "--kind", "sparse"], "unknown module kind"),
        (["import", "nosuchtask"], "unknown task"),
        (["import", "peftu:hatexplain"], "--data"),
        (["import", "verbagg", "--users", "1", "--limit", "2"], "not both"),
        (["import", "verbagg", "--label-fit", "median"], "label fit 'median' is not one of bias"),
        (["key", "issue"], "--admin"),
        (["key", "issue", "ann", "--admin"], "--admin"),
        (["key", "revoke"], "exactly one"),
    ],
)
def test_mistakes_are_one_line(store, args, needle):
    result = runner.invoke(app, ["users", *args, "--store", str(store)])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error:")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["show", "ghost"], "no user 'ghost'"),
        (["delete", "ghost", "--yes"], "no user 'ghost'"),
        (["rollback", "1"], "no module"),
        (["train", "ghost"], "no user(s) 'ghost'"),
        (["key", "issue", "ghost"], "no user 'ghost'"),
        (["key", "revoke", "--key", "tlm-u-nope"], "no such key"),
        (["import", "bfi", "--limit", "1"], "holds users of task verbagg"),
    ],
)
def test_mistakes_about_an_existing_store_are_one_line(store, args, needle):
    _imported(store, "1")
    result = runner.invoke(app, ["users", *args, "--store", str(store)])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_store_created_with_a_postgres_index_is_found_from_its_root(store, postgres, monkeypatch):
    monkeypatch.delenv("TAILORLM_INDEX_URL", raising=False)
    url = postgres.new_database()
    _json("users", "add", "ann", "--store", str(store), "--index", url)
    _json("users", "add", "bob", "--store", str(store))  # no --index: the store records it
    assert [u["user"] for u in _json("users", "list", "--store", str(store))["users"]] == ["ann", "bob"]
    assert not (store / "index.sqlite3").exists()
    assert UserService(store).store.index.where == url


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--index", "mysql://db/x"], None, "unknown index location 'mysql://db/x'"),
        (
            [],
            "postgresql://nobody:secret@127.0.0.1:1/x",
            "cannot open the index at postgresql://nobody@127.0.0.1:1/x",
        ),
    ],
)
def test_an_index_that_cannot_be_opened_is_one_line(store, args, env, message, monkeypatch):
    if env is None:
        monkeypatch.delenv("TAILORLM_INDEX_URL", raising=False)
    else:
        monkeypatch.setenv("TAILORLM_INDEX_URL", env)
    result = runner.invoke(app, ["users", "add", "ann", "--store", str(store), *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "secret" not in result.output, result.output


def test_a_store_under_an_fsspec_url_with_its_index_in_postgres(postgres, monkeypatch):
    """Every users command on a store whose module files, profiles and record are in fsspec's in-memory
    filesystem (as they would be on s3://) and whose index is in PostgreSQL."""
    import fsspec

    monkeypatch.delenv("TAILORLM_INDEX_URL", raising=False)
    root = f"memory://tailorlm-cli-{postgres.port}/store"
    fs, base = fsspec.core.url_to_fs(root)
    payload = _json(
        "users", "import", "verbagg", "--users", "1,2", "--model", "tiny", "--store", root,
        "--index", postgres.new_database(),
    )  # fmt: skip
    assert payload["store"] == root and fs.isfile(f"{base}/.store.json")
    assert sorted(_json("users", "train", "--epochs", "1", "--store", root)["trained"]) == ["1", "2"]
    assert fs.isfile(f"{base}/{cache_of('1')}/profile.json")  # what training writes, beside the modules
    shown = _json("users", "show", "1", "--store", root)
    assert shown["current_version"] == 1 and fs.isdir(f"{base}/{shown['versions'][0]['folder']}")
    forgotten = _json("users", "delete", "1", "--yes", "--store", root)
    assert forgotten["versions"] == [1] and forgotten["cache"] is True
    assert not fs.exists(f"{base}/{folder_name('1')}") and not fs.exists(f"{base}/{cache_of('1')}")
    assert fs.exists(f"{base}/{folder_name('2')}")
    assert [u["user"] for u in _json("users", "list", "--store", root)["users"]] == ["2"]


def test_a_train_that_diverges_lists_the_users_skipped_with_why(store, monkeypatch):
    from tailorlm.kinds.lora import Lora
    from tailorlm.users.training import DIVERGED

    _imported(store, "1,2")
    monkeypatch.setattr(Lora, "learning_rate", 1e9)  # every weight leaves fp16's range in one step
    trained = _json("users", "train", "--epochs", "1", "--store", str(store))
    assert trained["trained"] == [] and trained["skipped"] == {"1": DIVERGED, "2": DIVERGED}
    human = runner.invoke(app, ["users", "train", "--epochs", "1", "--store", str(store)])
    assert human.exit_code == 0 and "skipped 1: their training diverged" in human.output
    assert _json("users", "show", "1", "--store", str(store))["current_version"] is None


def test_import_keeps_a_blend_part_and_refuses_a_damaged_one_before_importing(store, tmp_path):
    import torch

    from tailorlm.data import load_task
    from tailorlm.methods.blend_part import Blender, ItemStatistics, part_for

    task = load_task("verbagg", seed=0)
    statistics = ItemStatistics.fit(task, task.users[:2])
    part = tmp_path / "blend-part-plain"
    part_for(
        task, statistics, Blender(statistics.sources, torch.ones(3), torch.zeros(3), torch.zeros(3)), None
    ).save(part)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    args = ["users", "import", "verbagg", "--users", "1,2", "--model", "tiny", "--store", str(store)]
    refused = CliRunner().invoke(app, [*args, "--blend", str(damaged)])
    assert refused.exit_code != 0 and "blend.json" in refused.output and "Traceback" not in refused.output
    assert not store.exists()  # nothing imported
    imported = CliRunner().invoke(app, [*args, "--blend", str(part)])
    assert imported.exit_code == 0, imported.output
    service = UserService(store)
    assert service.settings().blend == ".blend"
    assert service.blend_part().labels == tuple(task.labels)
    service.close()
