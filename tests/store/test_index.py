"""The store's index on both backends (SQLite, and a real PostgreSQL server): versions, rollback, pruning,
history, key hashes, forgetting a user, concurrent writers in several processes, and clear errors for
an index that cannot be opened."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading

import psycopg
import pytest

from tailorlm.store.index import SCHEMA_VERSION, HistoryRecord, StoreIndex, UnknownUserError, VersionRecord
from tailorlm.store.index_backends import StoreLocationError, without_password

CANARY = "zq-canary-7f3e91"


def version(user: str, sha: str = "0" * 64, fingerprint: str = "data-1") -> VersionRecord:
    return VersionRecord(
        user_id=user,
        version=0,
        kind="lora",
        spec={"kind": "lora", "rank": 8},
        base_model="tiny",
        base_fingerprint="base-1",
        created=1.0,
        size=123,
        sha256=sha,
        data_fingerprint=fingerprint,
        metrics={"val_loss": 0.5},
        folder=f"{user}/v{sha[:4]}",
    )


def location(index_url: str | None, tmp_path) -> str:
    return index_url or str(tmp_path / "index.sqlite3")


@pytest.fixture
def index(index_url, tmp_path):
    opened = StoreIndex(location(index_url, tmp_path))
    yield opened
    opened.close()


def test_versions_are_numbered_and_the_newest_is_current(index):
    first = index.add_version(version("ann", "a" * 64))
    second = index.add_version(version("ann", "b" * 64, fingerprint="data-2"))
    assert (first.version, second.version) == (1, 2)
    assert index.current("ann") == second
    assert [v.version for v in index.versions("ann")] == [1, 2]
    assert index.versions("ann")[0].spec == {"kind": "lora", "rank": 8}
    assert index.current("bob") is None and index.user_ids() == ["ann"]


def test_rollback_and_roll_forward(index):
    index.add_version(version("ann", "a" * 64))
    index.add_version(version("ann", "b" * 64))
    assert index.set_current("ann", 1).sha256 == "a" * 64
    assert index.current("ann").version == 1
    index.set_current("ann", 2)
    assert index.current("ann").version == 2
    with pytest.raises(KeyError, match=r"no version 7; stored versions: \[1, 2\]"):
        index.set_current("ann", 7)


def test_prune_keeps_the_newest_and_never_the_current(index):
    for n in range(5):
        index.add_version(version("ann", f"{n}" * 64))
    index.set_current("ann", 1)  # rolled back to the oldest
    dropped = index.prune("ann", keep=2)
    assert sorted(v.version for v in dropped) == [2, 3]
    assert [v.version for v in index.versions("ann")] == [1, 4, 5]
    with pytest.raises(ValueError, match="at least 1"):
        index.prune("ann", keep=0)


def test_history_appends_in_order(index):
    assert index.add_history("ann", [HistoryRecord("i1", "the bus was late", "yes")]) == 1
    assert index.add_history("ann", [HistoryRecord("i2", "rain", "no", "val", 5.0, {"item": 3})]) == 2
    items = index.history("ann")
    assert [i.item_id for i in items] == ["i1", "i2"]
    assert items[1] == HistoryRecord("i2", "rain", "no", "val", 5.0, {"item": 3})
    assert index.has_user("ann") and index.history("bob") == []


def test_keys_are_looked_up_by_hash_and_revoked(index):
    index.add_user("ann")
    index.add_key("hash-ann", "ann", "user")
    index.add_key("hash-admin", None, "admin")
    assert (index.find_key("hash-ann").user_id, index.find_key("hash-ann").role) == ("ann", "user")
    assert (index.find_key("hash-admin").user_id, index.find_key("hash-admin").role) == (None, "admin")
    assert index.find_key("nope") is None
    assert index.revoke_keys("ann") == 1 and index.find_key("hash-ann") is None
    with pytest.raises(UnknownUserError, match="no user 'nobody'"):
        index.add_key("hash-ghost", "nobody", "user")  # a key of a user the store does not have


def test_a_failed_transaction_leaves_nothing(index):
    index.add_version(version("ann", "a" * 64))
    with pytest.raises(RuntimeError), index.transaction() as db:
        db.execute("DELETE FROM versions WHERE user_id = 'ann'")
        raise RuntimeError("crash in the middle")
    assert [v.version for v in index.versions("ann")] == [1]


def test_forgetting_a_user_leaves_no_trace_in_the_files(index, index_url, tmp_path):
    index.add_history("ann", [HistoryRecord("i1", f"my secret is {CANARY}", CANARY)])
    index.add_version(version("ann", "a" * 64))
    index.add_user("bob")
    index.add_history("bob", [HistoryRecord("i1", "bob's own", "no")])
    index.add_key(f"hash-{CANARY}", "ann", "user")
    gone = index.delete_user("ann")
    assert [v.version for v in gone] == [1]
    assert not index.has_user("ann") and index.find_key(f"hash-{CANARY}") is None
    assert [i.input for i in index.history("bob")] == ["bob's own"]
    if index_url is not None:  # PostgreSQL: the delete was vacuumed, no dead row version is left
        assert dead_tuples(index_url) == {"users": 0, "versions": 0, "history": 0, "keys": 0}
        return
    files = sorted(tmp_path.glob("index.sqlite3*"))  # the database, its WAL and shared-memory files
    assert files
    for path in files:
        assert CANARY.encode() not in path.read_bytes(), f"{path.name} still holds the forgotten user's text"


def dead_tuples(url: str) -> dict[str, int]:
    """Dead row versions per table, counted exactly by reading the pages (pgstattuple, not statistics)."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        return {
            table: db.execute("SELECT dead_tuple_count FROM pgstattuple(%s)", (table,)).fetchone()[0]
            for table in ("users", "versions", "history", "keys")
        }


def test_two_connections_see_each_others_commits(index_url, tmp_path):
    first, second = StoreIndex(location(index_url, tmp_path)), StoreIndex(location(index_url, tmp_path))
    try:
        first.add_version(version("ann"))
        assert second.current("ann").version == 1
        threads = [threading.Thread(target=lambda: second.add_version(version("ann"))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [v.version for v in first.versions("ann")] == [1, 2, 3, 4, 5]
    finally:
        first.close()
        second.close()


def test_an_index_of_schema_1_gains_the_user_spec_column(tmp_path):
    path = tmp_path / "index.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "CREATE TABLE users (id TEXT PRIMARY KEY, created REAL NOT NULL, current_version INTEGER, "
        "data_fingerprint TEXT);"
        "INSERT INTO users VALUES ('ann', 1.0, NULL, NULL);"
    )
    old.close()
    index = StoreIndex(path)
    try:
        assert index.meta("schema_version") == str(SCHEMA_VERSION) and index.user_ids() == ["ann"]
        assert index.user_spec("ann") is None
        index.set_user_spec("ann", {"kind": "ia3"})
        assert index.user_spec("ann") == {"kind": "ia3"}
    finally:
        index.close()
    reopened = StoreIndex(path)  # opening it again finds the column there and changes nothing
    assert reopened.user_spec("ann") == {"kind": "ia3"} and reopened.meta("schema_version") == str(
        SCHEMA_VERSION
    )
    reopened.close()


def test_an_index_of_schema_3_gains_history_item_keys(index_url, tmp_path):
    where = location(index_url, tmp_path)
    index = StoreIndex(where)
    index.add_history("ann", [HistoryRecord("a1", "text", "yes")])
    index._backend.execute("ALTER TABLE history DROP COLUMN item_key")  # as schema 3 made it
    index.close()
    for _ in range(2):  # opening it adds the column once, then finds it there
        index = StoreIndex(where)
        assert index.history("ann") == [HistoryRecord("a1", "text", "yes")]  # an old row: no item key
        index.close()
    index = StoreIndex(where)
    index.add_history("ann", [HistoryRecord("a2", "text", "no", item_key="statement-7")])
    assert [r.item_key for r in index.history("ann")] == [None, "statement-7"]
    index.close()


def test_user_specs_and_meta(index):
    index.add_user("ann")
    index.set_user_spec("ann", {"kind": "lora", "rank": 4})
    assert index.user_spec("ann") == {"kind": "lora", "rank": 4}
    index.set_user_spec("ann", None)
    assert index.user_spec("ann") is None and index.user_spec("bob") is None
    with pytest.raises(KeyError, match="no user 'bob'"):
        index.set_user_spec("bob", {"kind": "ia3"})
    assert index.meta("task") is None
    index.set_meta("task", "verbagg")
    index.set_meta("task", "bfi")
    assert index.meta("task") == "bfi"


def test_unseen_history_skips_items_it_already_has(index):
    first = [HistoryRecord("i1", "a", "yes"), HistoryRecord("i2", "b", "no")]
    assert index.add_unseen_history("ann", first) == 2
    again = [
        HistoryRecord("i2", "changed", "no"),
        HistoryRecord("i3", "c", "no"),
        HistoryRecord("i3", "d", ""),
    ]
    assert index.add_unseen_history("ann", again) == 1
    assert index.add_unseen_history("ann", again) == 0
    assert [(i.item_id, i.input) for i in index.history("ann")] == [("i1", "a"), ("i2", "b"), ("i3", "c")]
    assert index.add_history("ann", first) == 5  # add_history appends items as given
    assert [i.item_id for i in index.history("ann")][-2:] == ["i1", "i2"]


def test_keys_are_listed_found_and_revoked_one_at_a_time(index):
    index.add_user("ann")
    index.add_key("hash-1", "ann", "user", "laptop")
    index.add_key("hash-2", "ann", "user")
    index.add_key("hash-admin", None, "admin")
    assert [k.key_hash for k in index.keys_of("ann")] == ["hash-1", "hash-2"]
    assert [k.role for k in index.keys_of(None)] == ["admin"]
    found = index.find_key("hash-1")
    assert (found.user_id, found.role, found.label) == ("ann", "user", "laptop")
    assert index.find_key("nope") is None
    assert index.revoke_key("hash-1") is True and index.revoke_key("hash-1") is False
    assert [k.key_hash for k in index.keys_of("ann")] == ["hash-2"]
    assert index.revoke_admin_keys() == 1 and index.keys_of(None) == []
    assert index.find_key("hash-2") is not None


WRITERS, ROUNDS = 4, 6


def _write(where: str, writer: int, start) -> None:
    """One writer process, opening the index at the same moment as the others: versions and history for
    the user every writer shares, versions for a user of its own, and history items every writer adds."""
    start.wait()
    index = StoreIndex(where)
    try:
        for n in range(ROUNDS):
            index.add_version(version("ann", f"{writer}{n}".ljust(64, "0")))
            index.add_version(version(f"own-{writer}"))
            index.add_history("ann", [HistoryRecord(f"w{writer}-{n}", "mine", "yes")])
            index.add_unseen_history("ann", [HistoryRecord(f"shared-{n}", "everyone's", "no")])
    finally:
        index.close()


def test_concurrent_writers_never_share_a_version_number(index_url, tmp_path):
    where = location(index_url, tmp_path)  # a new database: the writers also race to create the schema
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(WRITERS)
    writers = [context.Process(target=_write, args=(where, w, start)) for w in range(WRITERS)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    assert [p.exitcode for p in writers] == [0] * WRITERS
    index = StoreIndex(where)
    try:
        assert [v.version for v in index.versions("ann")] == list(range(1, WRITERS * ROUNDS + 1))
        assert index.current("ann").version == WRITERS * ROUNDS
        assert len({v.sha256 for v in index.versions("ann")}) == WRITERS * ROUNDS  # every write is there
        for writer in range(WRITERS):
            assert [v.version for v in index.versions(f"own-{writer}")] == list(range(1, ROUNDS + 1))
        items = [item.item_id for item in index.history("ann")]
        assert len(items) == WRITERS * ROUNDS + ROUNDS  # each shared item once, however many raced for it
        assert set(items) == {f"w{w}-{n}" for w in range(WRITERS) for n in range(ROUNDS)} | {
            f"shared-{n}" for n in range(ROUNDS)
        }
    finally:
        index.close()


OPENERS, OPENINGS = 8, 40


def _open_new_files(folder: str, start, errors) -> None:
    """One process opening a new SQLite index at the same moment as the others, ``OPENINGS`` times."""
    for n in range(OPENINGS):
        start.wait()
        try:
            StoreIndex(os.path.join(folder, f"{n}.sqlite")).close()
        except sqlite3.OperationalError as error:
            errors.put(f"opening {n}: {error}")


def test_processes_opening_a_new_sqlite_index_at_once_all_open_it(tmp_path):
    # Switching a new file to WAL answered "database is locked" at once, without the busy timeout, to
    # about one round in four of 8 processes (measured), so 40 rounds catch it.
    context = multiprocessing.get_context("spawn")
    start, errors = context.Barrier(OPENERS), context.Queue()
    openers = [
        context.Process(target=_open_new_files, args=(str(tmp_path), start, errors)) for _ in range(OPENERS)
    ]
    for process in openers:
        process.start()
    for process in openers:
        process.join(timeout=120)
    assert [p.exitcode for p in openers] == [0] * OPENERS
    failed = []
    while not errors.empty():
        failed.append(errors.get())
    assert failed == []


def test_an_index_that_cannot_be_opened_is_one_clear_error(postgres, tmp_path):
    with pytest.raises(StoreLocationError, match="unknown index location 'mysql://db/x'"):
        StoreIndex("mysql://db/x")
    closed = postgres.url("nothing").replace(f":{postgres.port}/", ":1/")
    with pytest.raises(
        StoreLocationError, match=r"cannot open the index at postgresql://tailorlm@127\.0\.0\.1:1/"
    ):
        StoreIndex(closed)
    with pytest.raises(StoreLocationError, match='database "nothing" does not exist') as error:
        StoreIndex(postgres.url("nothing", password="hunter2"))
    assert "hunter2" not in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(
        StoreLocationError, match=r"cannot open the index at postgresql://tailorlm@127\.0\.0\.1:x/"
    ):
        StoreIndex(postgres.url("nothing").replace(f":{postgres.port}/", ":x/"))
    with pytest.raises(StoreLocationError, match=r"cannot open the index at postgresql://\.\.\.: ") as error:
        StoreIndex("postgresql://ann:hunter2@[::1/x")
    assert "hunter2" not in str(error.value)
    assert StoreIndex(f"sqlite:///{tmp_path}/s.sqlite3").path == tmp_path / "s.sqlite3"


def _drop_connections(postgres, url: str) -> None:
    """End every other session on ``url``'s database from the server side, as a restart or failover does."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )


def test_a_dropped_connection_is_reopened_and_a_lost_write_is_one_clear_error(postgres):
    url = postgres.new_database()
    index = StoreIndex(url)
    try:
        index.add_user("ann")
        _drop_connections(postgres, url)
        assert index.has_user("ann")  # a read outside a transaction reopens the connection and retries
        _drop_connections(postgres, url)
        index.add_user("bob")  # so does a transaction's BEGIN
        assert index.has_user("bob")
        with (
            pytest.raises(
                StoreLocationError, match="during a write, which was not recorded; try again"
            ) as lost,
            index.transaction() as db,
        ):
            db.execute("INSERT INTO users(id, created) VALUES (?, ?)", ("cid", 1.0))
            _drop_connections(postgres, url)
            db.execute("INSERT INTO users(id, created) VALUES (?, ?)", ("dan", 1.0))
        assert "\n" not in str(lost.value) and "127.0.0.1" in str(lost.value)
        assert not index.has_user("cid") and not index.has_user("dan")  # nothing of it was committed
        index.add_user("cid")  # and the index goes on
        assert index.has_user("cid")
    finally:
        index.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://ann:s3cret@db:5432/store", "postgresql://ann@db:5432/store"),
        ("postgresql://db/store?password=s3cret&sslmode=require", "postgresql://db/store?sslmode=require"),
        ("postgresql://ann@db/store", "postgresql://ann@db/store"),
        ("postgres://a%40b:p%3Aw@db/s", "postgres://a%40b@db/s"),
        ("postgresql://ann:s3cret@[::1/store", "postgresql://..."),
    ],
)
def test_a_password_is_never_shown(url, shown):
    assert without_password(url) == shown


def test_opening_the_index_again_in_a_process_never_blinds_a_connection_it_holds(tmp_path):
    """A second ``StoreIndex`` of the same file opened and closed in this process (as a CLI command
    run in-process, or a worker's store, does) must leave the first one's SQLite locks alone: a
    descriptor of the file opened and closed beside SQLite drops them, the second connection's close
    then deletes the write-ahead log, and the first goes on reading a stale snapshot."""
    path = tmp_path / "index.sqlite3"
    held = StoreIndex(path)
    held.add_user("ann")
    for _ in range(2):
        StoreIndex(path).close()
    write = "import sys\nfrom tailorlm.store.index import StoreIndex\n"
    write += "StoreIndex(sys.argv[1]).add_user(sys.argv[2])"
    for user in ("bob", "cid"):  # other processes, each the last to close its connection
        subprocess.run([sys.executable, "-c", write, str(path), user], check=True, env=os.environ)
        assert held.has_user(user), f"the held connection no longer sees other processes' writes ({user})"
    held.close()
