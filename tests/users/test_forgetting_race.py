"""Forgetting is final, under concurrency, on both index backends: hundreds of seeded trials race a
delete (the service's, or ``tailorlm users delete``) against writers of the same user on other
connections, a thread and a separate process: history posts, version puts (what a retrain's end does),
key issues and spec changes. After the delete returns the user never comes back, and once the index is
compacted no file of the store and no index row holds any of their canaries."""

from __future__ import annotations

import multiprocessing
import os
import random
import sqlite3
import threading
import time
import uuid

import pytest
from typer.testing import CliRunner

from tailorlm import models
from tailorlm.cli import app
from tailorlm.engine.engine import Engine
from tailorlm.kinds import default_spec
from tailorlm.store.index import HistoryRecord, UnknownUserError
from tailorlm.store.store import folder_name
from tailorlm.train.trainer import TrainConfig
from tailorlm.users.errors import UserError
from tailorlm.users.service import UserService

TRIALS = int(
    os.environ.get("RACE_TRIALS", 200)
)  # per backend; each trial is one user created, raced and forgotten
SEED = 19
CANARY = "CANARY-race"
AFTER_DELETE = 0.004  # seconds the writers keep going after the delete returned


def _one_write(service: UserService, engine: Engine, user_id: str, rng: random.Random) -> bool:
    """One write for ``user_id`` of a random kind (history, a version, a key, a spec); True when the
    store took it."""
    canary = f"{CANARY}-{user_id}-{uuid.uuid4().hex[:8]}"
    choice = rng.randrange(4)
    try:
        if choice == 0:
            service.add_history(user_id, [HistoryRecord(canary, f"my secret {canary}", canary)])
        elif choice == 1:
            service.store.put(
                user_id,
                engine.spec,
                engine.bank.read(1),
                model=engine.model,
                base_name=engine.base.name,
                meta={"note": canary},
            )
        elif choice == 2:
            service.issue_key(user_id, label=canary)
        else:
            service.index.set_user_spec(user_id, {"kind": "lora", "rank": rng.choice([2, 4, 8])})
    except (UserError, UnknownUserError):
        return False
    return True


def _write_until(stop: threading.Event, service, engine, user_id: str, seed: int, counts: dict) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        counts["taken" if _one_write(service, engine, user_id, rng) else "refused"] += 1


def _tiny_engine() -> Engine:
    base = models.tiny_model(seed=0, tokenizer=models.load_tokenizer())
    return Engine(base, default_spec("lora"), slots=2)


def _writer_process(root: str, inbox, outbox, stop) -> None:
    """A second process writing for each user it is told of until ``stop`` is set (as a training worker
    or another server would), on its own connection."""
    service = UserService(root)
    engine = _tiny_engine()
    outbox.put("ready")
    for user_id, seed in iter(inbox.get, None):
        counts = {"taken": 0, "refused": 0}
        outbox.put("started")
        _write_until(stop, service, engine, user_id, seed, counts)
        outbox.put(counts)
    service.close()


def _leftovers(checker: UserService, user_id: str) -> list[str]:
    index = checker.index
    found = []
    if index.has_user(user_id):
        found.append("user row")
    if index.history(user_id):
        found.append("history")
    if index.versions(user_id):
        found.append("versions")
    if index.keys_of(user_id):
        found.append("keys")
    if index.tombstone(user_id) is None:
        found.append("no tombstone")
    home = checker.root / folder_name(user_id)
    if home.exists() and any(p.is_file() for p in home.rglob("*")):
        found.append("module files")
    return found


def test_a_forgotten_user_never_comes_back(index_url, tmp_path, make_engine):
    root = tmp_path / "store"
    checker = UserService(root, index=index_url)
    checker.add("first")  # the store exists (and records a PostgreSQL index) before anyone races
    engine = make_engine("lora", slots=2)
    deleter, writer = UserService(root), UserService(root)
    context = multiprocessing.get_context("spawn")
    inbox, outbox, stop_process = context.Queue(), context.Queue(), context.Event()
    process = context.Process(target=_writer_process, args=(str(root), inbox, outbox, stop_process))
    process.start()
    cli = CliRunner()
    rng = random.Random(SEED)
    resurrected: list[tuple[str, list[str]]] = []
    totals = {"taken": 0, "refused": 0, "cli": 0}
    try:
        assert outbox.get(timeout=120) == "ready"
        for trial in range(TRIALS):
            user_id = f"race-{trial}-{rng.randrange(10**6)}"
            checker.add(user_id, history=[HistoryRecord("h0", f"my secret {CANARY}-{user_id}", "yes")])
            stop_process.clear()
            stop_thread = threading.Event()
            counts = {"taken": 0, "refused": 0}
            inbox.put((user_id, rng.randrange(10**9)))
            thread = threading.Thread(
                target=_write_until, args=(stop_thread, writer, engine, user_id, rng.randrange(10**9), counts)
            )
            thread.start()
            assert outbox.get(timeout=60) == "started"
            time.sleep(rng.uniform(0.0, 0.02))  # the delete lands anywhere in the writers' stream
            if trial % 3 == 2:  # the command line, a process of its own opening the index anew
                answer = cli.invoke(
                    app, ["users", "delete", user_id, "--yes", "--store", str(root), "--json"]
                )
                assert answer.exit_code == 0, answer.output
                totals["cli"] += 1
            else:
                deleter.delete(user_id)
            time.sleep(AFTER_DELETE)  # writers keep trying after the delete returned
            stop_thread.set()
            stop_process.set()
            thread.join()
            process_counts = outbox.get(timeout=60)
            for key in ("taken", "refused"):
                totals[key] += counts[key] + process_counts[key]
            leftovers = _leftovers(checker, user_id)
            if leftovers:
                resurrected.append((user_id, leftovers))
    finally:
        inbox.put(None)
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    assert resurrected == [], f"{len(resurrected)} of {TRIALS} users came back: {resurrected[:5]}"
    assert totals["taken"] > TRIALS and totals["refused"] > TRIALS, totals  # both sides really raced

    for opened in (deleter, writer):
        opened.close()
    checker.index.checkpoint()  # nobody reads now: compaction must finish, and says so
    assert checker.index._rows("SELECT COUNT(*) AS n FROM tombstones WHERE compacted IS NULL")[0]["n"] == 0
    if index_url is None:  # the SQLite file and its write-ahead log, byte for byte
        holding = [p.name for p in root.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
        assert holding == []
        assert not (root / "index.sqlite3-wal").exists() or (root / "index.sqlite3-wal").stat().st_size == 0
    else:
        holding = [p for p in root.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
        assert holding == []
    for table, column in (
        ("history", "input"),
        ("keys", "label"),
        ("users", "spec"),
        ("versions", "metrics"),
    ):
        rows = checker.index._rows(f"SELECT COUNT(*) AS n FROM {table} WHERE {column} LIKE ?", f"%{CANARY}%")
        assert rows[0]["n"] == 0, table
    checker.close()


@pytest.mark.parametrize("how", ["service", "cli"])
def test_an_explicit_add_brings_a_forgotten_user_back_and_an_import_does_not(how, tmp_path):
    service = UserService(tmp_path / "store")
    service.import_task("verbagg", users=["1", "2"])
    service.delete("1")
    with pytest.raises(UserError, match=r"no user '1'.*forgotten at"):
        service.add_history("1", [HistoryRecord("x", "a", "b")])
    again = service.import_task("verbagg", users=["1", "2"])
    assert again.forgotten == ["1"] and again.users == ["2"] and not service.index.has_user("1")
    if how == "cli":
        answer = CliRunner().invoke(app, ["users", "add", "1", "--store", str(service.root)])
        assert answer.exit_code == 0, answer.output
    else:
        service.add("1")
    assert service.index.tombstone("1") is None and service.show("1").history == 0
    assert service.add_history("1", [HistoryRecord("x", "a", "b")]) == 1
    service.close()


def test_a_reader_holding_the_index_delays_compaction_without_blocking_and_it_finishes_later(tmp_path):
    service = UserService(tmp_path / "store")
    service.add("ann", history=[HistoryRecord("h", f"secret {CANARY}", "yes")])
    service.add("bob")
    reader = sqlite3.connect(service.root / "index.sqlite3", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM history").fetchone()  # a read transaction, as another process's
    started = time.monotonic()
    forgotten = service.delete("ann")
    took = time.monotonic() - started
    assert took < 5.0, f"the delete waited {took:.1f} s for a reader"
    assert forgotten.compacted is False and "reader" in forgotten.compaction
    with pytest.raises(UserError, match="not compacted away yet"):
        service.show("ann")
    assert service.show("bob").user_id == "bob"  # others are served meanwhile
    reader.execute("COMMIT")
    reader.close()
    deadline = time.monotonic() + 20
    while service.index.tombstone("ann").compacted is None:
        assert time.monotonic() < deadline, "the background compaction did not finish"
        time.sleep(0.1)
    with pytest.raises(UserError, match="compacted away"):
        service.show("ann")
    files = [p for p in service.root.rglob("*") if p.is_file()]
    assert files and not any(CANARY.encode() in p.read_bytes() for p in files)
    service.close()


@pytest.mark.parametrize("recreated", [False, True])
def test_a_user_forgotten_mid_training_is_not_stored_and_the_others_are(tmp_path, make_base, recreated):
    """What a worker does when ``tailorlm users delete`` lands mid-retrain: the store refuses the
    forgotten user's version, their profile is not written, and the users trained with them are stored.
    Created again at once (``users add``), the new user gets nothing trained on the old one's data."""
    service = UserService(tmp_path / "store", load_base=make_base)
    service.import_task("verbagg", users=["1", "2"])
    other = UserService(tmp_path / "store")
    deleted = []

    def delete_once(done: int, total: int) -> None:
        if not deleted:
            other.delete("1")  # another process's connection, while this one trains user 1
            deleted.append(True)
            if recreated:
                other.add("1")

    config = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-2, users_per_step=2)
    outcome = service.train(config=config, on_progress=delete_once)
    assert outcome.trained == ["2"] and service.store.has("2") and service.profile("2") is not None
    assert service.index.has_user("1") is recreated and service.store.versions("1") == []
    assert service.profile("1") is None and not service.store.files.exists(f"{folder_name('1')}/")
    if recreated:
        assert service.show("1").history == 0
    other.close()
    service.close()
