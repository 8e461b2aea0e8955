"""The two databases a store's index can live in, and the few places where their SQL differs.

``StoreIndex`` (``store.index``) writes every statement once, in the SQL both dialects agree on: ``?``
placeholders, ``INSERT ... ON CONFLICT``, ``DOUBLE PRECISION`` and ``BIGINT`` columns (which SQLite
stores with the same affinities as ``REAL`` and ``INTEGER``). A backend owns one connection and names
what differs:

- ``begin``: how a write transaction starts. SQLite's ``BEGIN IMMEDIATE`` takes the database's one
  write lock at once, so writers are serialized. PostgreSQL's plain ``BEGIN`` locks nothing, hence:
- ``lock_user``: on PostgreSQL every write for one user first takes a transaction-level advisory lock
  keyed by a 64-bit hash of the id (a row lock would not exist for a user not created yet, nor hold
  against one being deleted). Two writers of the same user then run one after the other: they never
  compute the same next version number, and a write never decides "the user exists" while a delete of
  them is under way. Writers of different users run side by side. None on SQLite.
- ``prepare_schema``: PostgreSQL's ``CREATE TABLE IF NOT EXISTS`` is not safe when several processes
  open a new index at once, so its schema transaction first takes an advisory lock.
- ``migrate``: the additive steps from an older schema (schema 1 existed only in SQLite files).
- ``reclaim``: what makes deleted rows go away after a user is forgotten, waiting a short while at most;
  it says why it could not (a reader that holds them).

``connect(location)`` picks the backend: a ``postgresql://`` (or ``postgres://``) URL, else a SQLite
file (a path, or a ``sqlite:///`` URL).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tailorlm.files import PRIVATE_FILE, private_folder

POSTGRES_SCHEMES = ("postgresql", "postgres")
SQLITE_PREFIX = "sqlite:///"
# Any fixed number: the advisory lock that serializes concurrent schema creation in one database.
_SCHEMA_LOCK = 0x7A11_0121
BUSY_TIMEOUT = 30.0  # seconds a SQLite write waits for another process's write to finish


class StoreLocationError(ValueError):
    """A store or its index cannot be opened where it was asked for (a wrong URL, an unreachable server,
    an index that belongs to another store); the message says which and why, in one line, without a
    password."""


def is_postgres(location: str | Path) -> bool:
    return isinstance(location, str) and location.split("://", 1)[0].lower() in POSTGRES_SCHEMES


def without_password(url: str) -> str:
    """``url`` with any password (``user:secret@`` or ``?password=``) removed: what may be printed or
    written to disk. libpq finds the password again in ``PGPASSWORD`` or ``~/.pgpass``. A URL too
    malformed to take apart is shown as its scheme alone."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed [IPv6] host
        return f"{url.split('://', 1)[0]}://..."
    netloc = parts.netloc
    if "@" in netloc:
        credentials, host = netloc.rsplit("@", 1)
        netloc = f"{credentials.split(':', 1)[0]}@{host}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def sqlite_path(location: str | Path) -> Path:
    """The file of a SQLite index given as a path or a ``sqlite:///`` URL (``sqlite:///relative`` and
    ``sqlite:////absolute``, as SQLAlchemy spells them); anything else with a scheme is an error."""
    text = str(location)
    if text.startswith(SQLITE_PREFIX):
        return Path(text[len(SQLITE_PREFIX) :])
    if "://" in text:
        raise StoreLocationError(
            f"unknown index location {without_password(text)!r}: give a postgresql://USER@HOST/DATABASE URL, "
            "a sqlite:///PATH URL or a SQLite file's path"
        )
    return Path(text)


class SqliteBackend:
    """The embedded default: one file beside (or anywhere away from) the module folders."""

    begin = "BEGIN IMMEDIATE"
    lock_user: str | None = None  # BEGIN IMMEDIATE already holds the only write lock

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        _private_file(path)
        # isolation_level=None: transactions are explicit (``StoreIndex.transaction``), nothing is begun
        # implicitly.
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        _enter_wal(self._db, BUSY_TIMEOUT)
        self._db.execute("PRAGMA foreign_keys=ON")
        # A deleted row's bytes are overwritten in the file, so a forgotten user's text is gone from it,
        # not merely unlinked from the b-tree.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA synchronous=FULL")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def prepare_schema(self) -> None:
        """Nothing: the schema transaction's BEGIN IMMEDIATE already excludes every other writer."""

    def migrate(self) -> None:
        """Bring an index written by an older version up to this schema; every step is additive."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(users)")}
        if "spec" not in columns:  # schema 1 had no per-user spec
            self._db.execute("ALTER TABLE users ADD COLUMN spec TEXT")
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(history)")}
        if "item_key" not in columns:  # schemas 1-3 kept no item keys
            self._db.execute("ALTER TABLE history ADD COLUMN item_key TEXT")

    def reclaim(self, wait: float, since: float) -> str | None:
        """``VACUUM`` the file, then fold the write-ahead log into it and truncate it; with
        ``secure_delete`` the deleted rows' bytes are then gone from everywhere the database keeps them.
        Runs on a connection of its own, so the threads sharing this one (a server's requests) read on
        meanwhile, and waits at most ``wait`` seconds for a lock (not the 30 s of ordinary writes).
        Returns None when done, else why not: another connection's read transaction keeps old pages in
        the log until it ends. (``since`` is PostgreSQL's concern.)"""
        own = sqlite3.connect(self.path, timeout=wait, isolation_level=None)
        try:
            own.execute("PRAGMA secure_delete=ON")
            try:
                own.execute("VACUUM")
            except sqlite3.OperationalError as error:
                return f"VACUUM could not run ({error}): another connection holds the index"
            busy, frames, _copied = own.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            wal = self.path.with_name(f"{self.path.name}-wal")
            if busy or frames or (wal.exists() and wal.stat().st_size):
                return (
                    "a reader holds the index open, so the write-ahead log (which still holds the "
                    "deleted rows) cannot be folded in and truncated"
                )
            return None
        finally:
            own.close()

    def close(self) -> None:
        self._db.close()


def _enter_wal(db: sqlite3.Connection, wait: float) -> None:
    """Switch the file to write-ahead logging, retrying for at most ``wait`` seconds. When several
    processes open a new file at once, the switch can answer "database is locked" at once, without
    the connection's busy timeout (SQLite refuses a lock upgrade that could deadlock instead of
    waiting for it); the first switch is kept in the file, so a retry soon finds WAL already set."""
    deadline = time.monotonic() + wait
    pause = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            busy = "locked" in str(error) or "busy" in str(error)
            if not busy or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _private_file(path: Path) -> None:
    """Create the index file owner-only (0600) whatever the umask, before SQLite opens it: SQLite gives
    its ``-wal`` and ``-shm`` files the database file's mode, so they follow. An index an older version
    made readable to others is narrowed when its owner opens it; another account's file is left alone.

    An existing file is never opened here: closing any descriptor of a file drops every POSIX lock this
    process holds on it, SQLite's included (another connection of this process would lose its locks, and
    a third would then delete the write-ahead log under it). Only a missing file is created, exclusively."""
    private_folder(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    for file in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        with contextlib.suppress(OSError):  # absent, or not ours
            if file.stat().st_uid == os.getuid() and file.stat().st_mode & 0o077:
                os.chmod(file, PRIVATE_FILE)


@functools.lru_cache(maxsize=256)
def _pyformat(sql: str) -> str:
    """psycopg's placeholders: ``?`` -> ``%s`` (a literal ``%`` doubled). The index's SQL has no ``?``
    inside string literals."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresBackend:
    """A PostgreSQL database shared by every machine of a deployment (psycopg 3). The connection is in
    autocommit mode: a read is one statement, a write runs between ``begin`` and COMMIT, and ``VACUUM``
    (which refuses to run inside a transaction) can run after a user is forgotten."""

    begin = "BEGIN"
    lock_user: str | None = "SELECT pg_advisory_xact_lock(?::bigint)"

    def __init__(self, url: str) -> None:
        self.where = without_password(url)
        self._url = url
        self._in_transaction = False
        self._db = self._connect()

    def _connect(self) -> Any:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise StoreLocationError(
                f"the index at {self.where} is in PostgreSQL, which needs psycopg: "
                "pip install 'tailorlm[postgres]'"
            ) from None
        try:
            return psycopg.connect(self._url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except psycopg.Error as error:
            raise StoreLocationError(
                f"cannot open the index at {self.where}: {self._reason(error)}"
            ) from None

    def _reason(self, error: Exception) -> str:
        # libpq's messages span lines, and may quote the connection string back (password and all).
        return " ".join(str(error).replace(self._url, self.where).split())

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """One statement. A connection the server dropped (a restart, a failover, an idle timeout) is
        opened again: a statement outside a transaction (a read, ``BEGIN``, ``VACUUM``) is retried once
        on the new connection; a transaction it was in is lost, and that is one ``StoreLocationError``
        saying what became of the write."""
        import psycopg

        command = sql.strip().split(None, 1)[0].upper() if sql.strip() else ""
        if self._db.closed or self._db.broken:
            if command == "ROLLBACK":  # the server ended the transaction with the connection
                self._in_transaction = False
                return None
            if self._in_transaction:
                self._lost(command, "the connection was already closed")
            self._reopen()
        try:
            result = self._db.execute(_pyformat(sql), tuple(args))
        except psycopg.OperationalError as error:
            if not self._disconnected(error):
                raise
            if command == "ROLLBACK":
                self._in_transaction = False
                return None
            if self._in_transaction or command == "COMMIT":
                self._lost(command, self._reason(error))
            self._reopen()
            result = self._db.execute(_pyformat(sql), tuple(args))
        if command == "BEGIN":
            self._in_transaction = True
        elif command in ("COMMIT", "ROLLBACK"):
            self._in_transaction = False
        return result

    def _disconnected(self, error: Exception) -> bool:
        """Whether ``error`` means the connection is gone, not that a statement failed (a lock or a
        statement timeout is an ``OperationalError`` too): libpq saw it broken, the socket closed under
        it (no SQLSTATE), or the server said so (class 08, or 57P0x: shut down or restarting)."""
        state = getattr(error, "sqlstate", None)
        return self._db.broken or state is None or state.startswith(("08", "57P0"))

    def _lost(self, command: str, reason: str) -> None:
        """The connection broke inside a transaction: the server rolled it back, unless it broke at the
        COMMIT itself, when nobody here can know."""
        self._in_transaction = False
        if command == "COMMIT":
            raise StoreLocationError(
                f"lost the connection to the index at {self.where} while committing: the write may or may "
                f"not have been recorded ({reason})"
            )
        raise StoreLocationError(
            f"lost the connection to the index at {self.where} during a write, which was not recorded; "
            f"try again ({reason})"
        )

    def _reopen(self) -> None:
        try:
            self._db.close()
        finally:
            self._db = self._connect()

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Many rows of one statement, inside a transaction (a broken connection loses it, as ``execute``
        says)."""
        import psycopg

        rows = list(rows)
        if not rows:
            return
        if self._db.closed or self._db.broken:
            self._lost("", "the connection was already closed")
        try:
            with self._db.cursor() as cursor:
                cursor.executemany(_pyformat(sql), rows)
        except psycopg.OperationalError as error:
            if not self._disconnected(error):
                raise
            self._lost("", self._reason(error))

    def prepare_schema(self) -> None:
        self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))

    def migrate(self) -> None:
        """Bring an index written by an older version up to this schema (every PostgreSQL index was
        created at schema 2 or later); runs under the schema lock, so one process adds a column. The
        catalogue is read first: ``ALTER TABLE`` locks the table against every reader even when it has
        nothing to do."""
        found = self.execute(
            "SELECT 1 AS found FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'history' AND column_name = 'item_key'"
        ).fetchone()
        if found is None:  # schemas 2-3 kept no item keys
            self.execute("ALTER TABLE history ADD COLUMN item_key TEXT")

    def reclaim(self, wait: float, since: float) -> str | None:
        """``VACUUM`` the tables a forgotten user had rows in, so their dead row versions are removed
        from the tables and their indexes and the space is marked free for reuse. Returns None when
        done, else why not: a transaction of another connection open since before the delete (at
        ``since``, this machine's clock) still sees the rows, so ``VACUUM`` must keep them. Waits at most
        ``wait`` seconds for the table locks (which only another ``VACUUM`` or a schema change holds).

        What this does not guarantee: plain ``VACUUM`` does not zero freed space, so deleted bytes can
        stay in the data files until new rows overwrite them (measured on PostgreSQL 15: a forgotten
        user's text was gone from the tables' files, but a deleted key's hash stayed in its b-tree index
        page; ``VACUUM FULL`` and ``REINDEX`` would rewrite them, at the price of locking each table
        against every reader and writer); rows still visible to a transaction open elsewhere
        stay until it ends; and copies outside the tables (the write-ahead log until its segments are
        recycled, WAL archives, replicas' history, base backups, ``pg_dump`` files) are not touched.
        Those follow the database's own retention, which an operator must set to match what forgetting
        a user promises."""
        import psycopg

        # A connection of its own: the threads sharing this one go on meanwhile.
        try:
            own = psycopg.connect(
                self._url, autocommit=True, row_factory=dict_row_factory(), connect_timeout=10
            )
        except psycopg.Error as error:
            return f"could not connect to compact ({self._reason(error)})"
        with own:
            return self._vacuum(own, wait, since)

    def _vacuum(self, own: Any, wait: float, since: float) -> str | None:
        import psycopg

        blockers = own.execute(
            "SELECT count(*) AS open FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND datname = current_database() AND backend_xmin IS NOT NULL "
            "AND xact_start <= to_timestamp(%s)",
            (since,),
        ).fetchone()["open"]
        own.execute(f"SET lock_timeout = {max(1, int(wait * 1000))}")
        try:
            own.execute("VACUUM (INDEX_CLEANUP ON) users, versions, history, keys")
        except psycopg.errors.LockNotAvailable as error:
            return f"VACUUM could not take its locks ({self._reason(error)})"
        if blockers:
            return (
                f"{blockers} transaction(s) of other connections open since before the delete still see "
                "the deleted rows, so VACUUM keeps them until they end"
            )
        return None

    def close(self) -> None:
        self._db.close()


def dict_row_factory() -> Any:
    from psycopg.rows import dict_row

    return dict_row


Backend = SqliteBackend | PostgresBackend


def connect(location: str | Path) -> Backend:
    """The backend for ``location``: a ``postgresql://`` URL, else a SQLite file."""
    if is_postgres(location):
        return PostgresBackend(str(location))
    return SqliteBackend(sqlite_path(location))
