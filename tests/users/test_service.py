"""UserService on the tiny model: importing users and their history, fingerprints, training many users per
step with resume after a kill, retraining from the current module, one engine per spec, a worker process
given only the root, rollback, and forgetting a user without a trace in any file."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tailorlm.data import load_task
from tailorlm.store.index import HistoryRecord
from tailorlm.store.store import ModuleStore
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig
from tailorlm.users.errors import UserError
from tailorlm.users.service import UserService, check_user_id
from tailorlm.users.training import DIVERGED

CANARY = "zq-canary-5d1b77"
# One epoch, small batches: 20 training items of a verbagg user are 5 steps.
CONFIG = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-2, users_per_step=2)


# Ids that are no single segment of /v1/users/{id}, so HTTP could neither reach nor forget them.
NO_PATH_SEGMENT = ["a/b", "../etc", "a\\b", ".", "..", "/"]


class Killed(Exception):
    pass


@pytest.fixture
def service(tmp_path, make_base):
    opened = UserService(tmp_path / "store", load_base=make_base)
    yield opened
    opened.close()


@pytest.fixture
def imported(service):
    service.import_task("verbagg", users=["1", "2", "3"])
    return service


@pytest.mark.parametrize(
    "bad",
    ["", " ann", "ann\n", "a\x00b", "a\x1bb", "x" * 129, "\udc80", "a\u2028b", 5, None, *NO_PATH_SEGMENT],
)
def test_bad_user_ids_are_refused_before_anything_is_written(service, bad):
    with pytest.raises(UserError, match="printable characters"):  # the message states the rule
        check_user_id(bad)
    with pytest.raises(UserError):
        service.add(bad)
    assert not service.exists() or service.index.user_ids() == []


@pytest.mark.parametrize(
    "good", ["ann", "...", "a.b", "%2F", "a?b#c", "über-user", "x" * 128, "index.sqlite3", "u-" + "0" * 64]
)
def test_odd_but_printable_ids_are_users_with_a_safe_folder(service, good):
    info = service.add(good, kind="ia3")
    assert (info.user_id, info.kind, info.history, info.current_version) == (good, "ia3", 0, None)
    assert service.store.user_folder(good).parent == service.root
    assert service.store.user_folder(good) != service.root / "index.sqlite3"
    with pytest.raises(UserError, match="already exists"):
        service.add(good)


def test_reading_a_store_that_is_not_there_is_an_error_that_creates_nothing(service):
    for read in (service.list_users, lambda: service.show("ann"), service.train):
        with pytest.raises(UserError, match="no user store"):
            read()
    assert not service.root.exists()


def test_import_writes_train_and_val_items_once_and_records_the_task(imported, make_base):
    task = load_task("verbagg")
    user = task.user("2")
    records = imported.history("2")
    assert [(r.item_id, r.split) for r in records] == [(e.id, "train") for e in user.train] + [
        (e.id, "val") for e in user.val
    ]
    assert records[0].input == user.train[0].text and records[0].target == user.train[0].target
    assert records[0].fields == dict(user.train[0].fields)
    assert not {e.id for e in user.test} & {r.item_id for r in records}  # held-out answers stay out
    before = {u: imported.data_fingerprint(u) for u in ("1", "2", "3")}

    again = imported.import_task("verbagg", users=["1", "2", "3", "4"])
    assert (again.new_users, again.items_added) == (1, 22)  # only user 4 is new
    assert {u: imported.data_fingerprint(u) for u in ("1", "2", "3")} == before
    assert len(imported.history("2")) == 22

    reopened = UserService(imported.root, load_base=make_base)  # settings live in the store
    settings = reopened.settings()
    assert (settings.task, settings.labels, settings.seed) == ("verbagg", ("no", "perhaps", "yes"), 0)
    assert reopened.task().name == "verbagg" and reopened.data_user("2").history[0].id == user.train[0].id
    with pytest.raises(UserError, match="holds users of task verbagg"):
        reopened.import_task("bfi", users=1)
    with pytest.raises(UserError, match="unknown task"):
        reopened.import_task("nosuchtask")
    with pytest.raises(UserError, match="no user"):
        reopened.import_task("verbagg", users=["1", "no-such-user"])
    with pytest.raises(UserError, match="unknown module kind"):
        reopened.import_task("verbagg", users=1, kind="sparse")
    assert reopened.index.user_ids() == ["1", "2", "3", "4"]


def test_a_task_from_your_own_files_keeps_its_folder_and_labels(service):
    folder = Path(__file__).parents[1] / "data" / "fixtures" / "peftu" / "hatexplain"
    task = load_task("peftu:hatexplain", data_dir=folder)
    result = service.import_task("peftu:hatexplain", data_dir=folder, users=2)
    assert result.users == [u.id for u in task.users[:2]] and result.new_users == 2
    settings = service.settings()
    assert (settings.task, settings.data_dir, settings.labels) == (task.name, str(folder), task.labels)
    user = task.users[0]
    assert len(service.history(user.id)) == len(task.training_examples(user)) + len(user.val)
    with pytest.raises(UserError, match="--data"):
        service.import_task("peftu:hatexplain")


def test_a_record_without_an_item_key_keeps_the_fingerprint_it_had_before_item_keys():
    """Stores written before history kept item keys: their users stay up to date, not all out of date."""
    import hashlib
    import json

    from tailorlm.users.history import fingerprint

    record = HistoryRecord("i1", "text", "yes", "val", 3.5, {"a": 1})
    old = hashlib.sha256()
    old.update(json.dumps(["i1", "text", "yes", "val", 3.5, {"a": 1}], sort_keys=True).encode() + b"\n")
    assert fingerprint([record]) == old.hexdigest()
    assert (
        fingerprint([HistoryRecord("i1", "text", "yes", "val", 3.5, {"a": 1}, "item-9")]) != old.hexdigest()
    )


def test_the_fingerprint_follows_the_history(imported):
    first = imported.data_fingerprint("1")
    assert first == imported.data_fingerprint("1") and first != imported.data_fingerprint("2")
    new = HistoryRecord("1/new", f"I saw {CANARY}", "yes")
    assert imported.add_history("1", [new, new]) == 1
    changed = imported.data_fingerprint("1")
    assert changed != first
    assert imported.add_history("1", [new]) == 0  # a retried request adds nothing
    assert imported.data_fingerprint("1") == changed
    with pytest.raises(UserError, match="split"):
        imported.add_history("1", [HistoryRecord("1/x", "a", "b", split="test")])
    with pytest.raises(UserError, match="no user"):
        imported.add_history("nobody", [new])


def test_a_killed_train_resumes_with_only_the_unfinished_users(imported):
    one_at_a_time = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-2, users_per_step=1)

    def die_once_someone_is_stored(done, total):
        if imported.store.users():
            raise Killed

    with pytest.raises(Killed):
        imported.train(config=one_at_a_time, on_progress=die_once_someone_is_stored)
    (first,) = imported.store.users()
    stored = imported.store.current(first)
    assert stored.data_fingerprint == imported.data_fingerprint(first)
    assert imported.show(first).needs_training is None

    finished = []
    outcome = imported.train(config=one_at_a_time, on_user=lambda record: finished.append(record.user_id))
    assert sorted(outcome.trained) == sorted({"1", "2", "3"} - {first}) == sorted(finished)
    assert outcome.skipped == {first: "up to date"}
    assert imported.store.versions(first) == [stored]  # not trained again
    assert imported.train(config=one_at_a_time).trained == []


def test_users_train_together_and_only_changed_ones_again(imported, monkeypatch):
    progress = []
    outcome = imported.train(config=CONFIG, on_progress=lambda done, total: progress.append((done, total)))
    assert sorted(outcome.trained) == ["1", "2", "3"]
    assert progress[0] == (2, 15) and progress[-1] == (15, 15)  # two users per step, 5 steps each
    assert [info.needs_training for info in imported.list_users()] == [None, None, None]

    imported.add_history("2", [HistoryRecord("2/later", "The train was cancelled. I would shout.", "yes")])
    info = imported.show("2")
    assert info.data_changed and info.needs_training.startswith("history changed")
    seen = {}
    real_run = MultiUserTrainer.run

    def spy(self, users, *args, **kwargs):
        seen.update({u.user_id: u.init for u in users})
        return real_run(self, users, *args, **kwargs)

    monkeypatch.setattr(MultiUserTrainer, "run", spy)
    current = imported.store.loader(imported.spec_of("2"))("2")
    assert imported.train(config=CONFIG, start_from_current=True).trained == ["2"]
    assert list(seen) == ["2"]
    assert seen["2"].keys() == current.keys()
    assert all(torch.equal(seen["2"][name], current[name]) for name in current)
    after = imported.show("2")
    assert (after.current_version, after.data_changed, after.needs_training) == (2, False, None)
    assert len(after.versions) == 2 and after.versions[-1].data_fingerprint == imported.data_fingerprint("2")
    assert imported.show("1").current_version == 1

    assert sorted(imported.train(["1", "2"], changed_only=False, config=CONFIG).trained) == ["1", "2"]
    with pytest.raises(UserError, match="no user"):
        imported.train(["1", "ghost"], config=CONFIG)


def test_a_retrain_that_diverges_keeps_the_users_previous_version_and_says_why(imported):
    assert sorted(imported.train(config=CONFIG).trained) == ["1", "2", "3"]
    before = {user: imported.store.current(user) for user in ("1", "2", "3")}
    exploding = dataclasses.replace(CONFIG, learning_rate=1e9)  # every weight leaves fp16's range
    outcome = imported.train(["1", "2"], changed_only=False, config=exploding)
    assert outcome.trained == []
    assert outcome.skipped == {"1": DIVERGED, "2": DIVERGED}
    assert {user: imported.store.current(user) for user in ("1", "2", "3")} == before
    assert imported.store.get("1").tensors  # the kept version still reads, finite
    assert sorted(imported.train(["1", "2"], changed_only=False, config=CONFIG).trained) == ["1", "2"]


def test_one_engine_per_module_spec(service, make_base):
    loads = []

    def counting_loader():
        loads.append(1)
        return make_base()

    counted = UserService(service.root, load_base=counting_loader)
    counted.import_task("verbagg", users=["1", "2"])
    counted.import_task("verbagg", users=["3"], kind="ia3")
    counted.add("empty")  # nothing to train on: skipped, never an engine of its own
    outcome = counted.train(config=CONFIG)
    assert sorted(outcome.trained) == ["1", "2", "3"] and outcome.skipped == {"empty": "no training items"}
    assert len(loads) == 3  # an engine per spec, then the plain base that writes the profiles
    assert [counted.store.current(u).kind for u in ("1", "2", "3")] == ["lora", "lora", "ia3"]
    with pytest.raises(UserError, match="no training items"):
        counted.train(["empty"], config=CONFIG)


def test_a_worker_process_trains_from_the_store_root_alone(imported):
    _train_in_a_worker(imported)


def test_a_worker_process_finds_a_postgres_index_from_the_store_root(
    tmp_path, make_base, postgres, monkeypatch
):
    monkeypatch.delenv("TAILORLM_INDEX_URL", raising=False)
    service = UserService(tmp_path / "store", load_base=make_base, index=postgres.new_database())
    service.import_task("verbagg", users=["1", "2"])
    assert not (service.root / "index.sqlite3").exists()
    _train_in_a_worker(service)


def _train_in_a_worker(imported: UserService) -> None:
    """User 2 trained by another process given only the store's root, as the server's workers are."""
    imported.configure(base_model="tiny")
    imported.close()
    script = (
        "import json, sys\n"
        "from tailorlm.users.service import train_users\n"
        "print(json.dumps(train_users(sys.argv[1], ['2'])))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(imported.root)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == ["2"]
    stored = ModuleStore(imported.root)
    assert stored.users() == ["2"] and stored.current("2").base_model == "tiny-llama-2x64"
    assert stored.current("2").data_fingerprint == imported.data_fingerprint("2")
    stored.close()


def test_rollback_serves_an_earlier_version(imported):
    imported.train(["1"], config=CONFIG)
    imported.add_history("1", [HistoryRecord("1/later", "The lift is stuck. I would scold.", "no")])
    imported.train(["1"], config=CONFIG)
    assert imported.rollback("1").version == 1
    info = imported.show("1")
    assert info.current_version == 1 and info.needs_training.startswith("history changed")
    assert imported.rollback("1", 2).version == 2
    with pytest.raises(UserError, match="no version 7"):
        imported.rollback("1", 7)
    imported.rollback("1", 1)
    with pytest.raises(UserError, match="no version before 1"):
        imported.rollback("1")
    with pytest.raises(UserError, match="no module"):
        imported.rollback("2")
    with pytest.raises(UserError, match="no user"):
        imported.rollback("ghost")


def test_deleting_a_user_leaves_nothing_of_them_in_any_file(imported):
    forgotten_id = f"user-{CANARY}"
    history = [HistoryRecord(f"c{i}", f"My secret is {CANARY} number {i}.", "yes") for i in range(6)]
    imported.add(forgotten_id, history=[*history, HistoryRecord("cv", f"{CANARY} again", "no", "val")])
    imported.train([forgotten_id, "1"], config=CONFIG)
    key = imported.issue_key(forgotten_id)
    other_key = imported.issue_key("1")
    cache = imported.cache_folder(forgotten_id)
    assert (cache / "profile.json").is_file()  # training wrote their profile
    (cache / "profile.json").write_text(json.dumps({"profile": CANARY}))
    assert any(CANARY.encode() in p.read_bytes() for p in imported.root.rglob("*") if p.is_file())

    gone = imported.delete(forgotten_id)
    assert (gone.versions, gone.history, gone.keys, gone.cache) == ([1], 7, 1, True)
    files = [p for p in imported.root.rglob("*") if p.is_file()]
    assert any(p.name.startswith("index.sqlite3") for p in files)
    for path in files:
        assert CANARY.encode() not in path.read_bytes(), f"{path} still holds the forgotten user"
    assert not imported.store.user_folder(forgotten_id).exists() and not cache.exists()
    assert imported.resolve_key(key) is None
    assert imported.resolve_key(other_key).user_id == "1"
    assert imported.index.user_ids() == ["1", "2", "3"] and imported.store.users() == ["1"]
    with pytest.raises(UserError, match="no user"):
        imported.delete(forgotten_id)


def test_an_import_with_text_the_index_cannot_keep_imports_nothing(tmp_path):
    """Own data with a NUL (PostgreSQL's text refuses it) in its last user's rows: one line naming the
    item and the field, and no user, history or setting is written. (pandas reads a lone surrogate's JSON
    escape as U+FFFD, so only the Python API can hand one over: the test below.)"""
    bad = "a NUL \u0000 in the text"
    rows = [
        {
            "annotator": f"a{u}",
            "text": f"message {i}",
            "label": "yes" if (u + i) % 2 else "no",
            "mid": f"m{i}",
        }
        for u in range(4)
        for i in range(10)
    ]
    for row in rows[-10:]:  # the last user's rows, whichever split they land in: earlier users come first
        row["text"] = f"{bad} {row['mid']}"
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))  # ensure_ascii: the escapes survive
    task = tmp_path / "task.json"
    columns = {"user": "annotator", "input": "text", "target": "label", "item": "mid"}
    task.write_text(
        json.dumps({"name": "tone", "kind": "classification", "instruction": "Rude?", "columns": columns})
    )
    service = UserService(tmp_path / "store")
    with pytest.raises(UserError, match="input holds a"):
        service.import_task(str(task), data_dir=data)
    assert service.index.user_ids() == [] and service.settings().task is None
    service.close()


@pytest.mark.parametrize("field", ["item_id", "input", "target", "item_key"])
@pytest.mark.parametrize("bad", ["\u0000", "\ud800", "x\udfffy"])
def test_history_text_the_index_cannot_keep_is_one_line_and_adds_nothing(imported, field, bad):
    before = imported.history("1")
    record = dataclasses.replace(HistoryRecord("1/ok", "fine", "yes", item_key="k"), **{field: bad})
    with pytest.raises(UserError, match=f"{field} holds a"):
        imported.add_history("1", [HistoryRecord("1/first", "fine", "yes"), record])
    assert imported.history("1") == before


def test_a_label_fit_that_comes_out_non_finite_skips_that_user_alone(service, monkeypatch):
    """A label-bias user whose fitted part holds a NaN is not stored and is listed as diverged; the others
    of the same fit are stored."""
    from tailorlm.methods import label_parts

    service.import_task("verbagg", users=["1", "2", "3"], kind="label-bias")
    real = label_parts.fit_user_parts

    def one_nan(*args, **kwargs):
        fitted = real(*args, **kwargs)
        bias, weight = fitted.parts["2"]
        fitted.parts["2"] = (torch.full_like(bias, float("nan")), weight)
        return fitted

    monkeypatch.setattr(label_parts, "fit_user_parts", one_nan)
    outcome = service.train()
    assert sorted(outcome.trained) == ["1", "3"] and outcome.skipped == {"2": DIVERGED}
    assert service.store.current("2") is None and service.store.current("1") is not None
