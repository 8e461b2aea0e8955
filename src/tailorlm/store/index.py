"""The store's index: the one record of which users exist, their module versions, their history items
and their API keys (as hashes). One interface (``StoreIndex``), two databases (``store.index_backends``):

- SQLite, the default for one machine: one file beside the module folders, embedded (nothing to
  start), transactional, safe for several processes (the server and a training worker) with WAL and a
  busy timeout. Forgetting a user must leave nothing of them behind, so ``secure_delete`` overwrites
  deleted rows in the file, and after a delete the file is vacuumed and the WAL checkpointed and
  truncated (``compact``).
- PostgreSQL, for workers and replicas on several machines (a ``postgresql://`` URL): every write of a
  user holds that user's lock, so concurrent writers never share a version number; forgetting a user
  vacuums the tables it touched (see ``PostgresBackend.reclaim`` for what that does and does not remove).

Whether a user exists is decided here and nowhere else, inside the transaction of the write that depends
on it. Every write for one user (creating them, a version, history, a key, their spec, forgetting them)
first takes that user's lock (SQLite: the database's one write lock; PostgreSQL: an advisory lock keyed
by the id, which also covers a user whose row does not exist yet), so "exists?" and the write are one
step. Forgetting a user leaves a tombstone: an HMAC of the id under a salt kept in ``meta`` (the id
itself is not kept). A write for a tombstoned id is refused (``ForgottenUserError``) until an explicit
re-create (``add_user(..., revive=True)``) removes the tombstone: no retrain finishing late, history
post racing the delete or worker of a killed server can bring a forgotten user back.

Every statement below is written once, in the SQL both agree on.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tailorlm.store.index_backends import Backend, connect

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite3"
SCHEMA_VERSION = 4  # 2: users.spec (a user's own module spec); 3: tombstones; 4: history.item_key
SALT_KEY = "tombstone_salt"  # the meta row holding the salt of tombstones' HMACs
# Compaction after a delete waits this long for a lock at most (seconds): a reader holding the index
# makes it give up and retry in the background, never makes other requests wait behind it for long.
COMPACT_WAIT = 0.2
COMPACT_RETRY = (0.5, 30.0)  # first and longest pause between background retries, in seconds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    created DOUBLE PRECISION NOT NULL,
    current_version INTEGER,
    spec TEXT
);
CREATE TABLE IF NOT EXISTS versions (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    base_model TEXT,
    base_fingerprint TEXT,
    created DOUBLE PRECISION NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    data_fingerprint TEXT,
    metrics TEXT NOT NULL,
    folder TEXT NOT NULL,
    PRIMARY KEY (user_id, version)
);
CREATE TABLE IF NOT EXISTS history (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    input TEXT NOT NULL,
    target TEXT NOT NULL,
    split TEXT NOT NULL,
    time DOUBLE PRECISION,
    fields TEXT NOT NULL,
    item_key TEXT,
    PRIMARY KEY (user_id, seq)
);
CREATE TABLE IF NOT EXISTS keys (
    key_hash TEXT PRIMARY KEY,
    user_id TEXT REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    label TEXT
);
CREATE TABLE IF NOT EXISTS tombstones (
    id_hash TEXT PRIMARY KEY,
    deleted DOUBLE PRECISION NOT NULL,
    compacted DOUBLE PRECISION
);
"""
_ADD_USER = "INSERT INTO users(id, created) VALUES (?, ?) ON CONFLICT DO NOTHING"
_UPSERT_META = (
    "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)


class UnknownUserError(KeyError):
    """A write names a user the index does not hold."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""


class ForgottenUserError(UnknownUserError):
    """A write names a user who was forgotten: refused until they are explicitly created again."""


@dataclass(frozen=True)
class Tombstone:
    """What the index keeps of a forgotten user: when, and whether their deleted rows are compacted
    away yet (None: not yet, ``StoreIndex.compact``)."""

    deleted: float
    compacted: float | None


@dataclass(frozen=True)
class VersionRecord:
    """One stored module version of one user, as the index records it."""

    user_id: str
    version: int
    kind: str
    spec: dict[str, Any]
    base_model: str | None
    base_fingerprint: str | None
    created: float
    size: int
    sha256: str
    data_fingerprint: str | None
    metrics: dict[str, Any]
    folder: str  # relative to the store's root

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> VersionRecord:
        values = dict(row)
        values["spec"] = json.loads(values["spec"])
        values["metrics"] = json.loads(values["metrics"])
        return cls(**values)


@dataclass(frozen=True)
class KeyRecord:
    """One API key as the index records it: its hash, never the key."""

    key_hash: str
    user_id: str | None  # None: an admin key
    role: str
    created: float
    label: str | None


@dataclass(frozen=True)
class HistoryRecord:
    """One item of a user's history: what retrieval, profiles and retraining read."""

    item_id: str
    input: str
    target: str
    split: str = "train"
    time: float | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    # The task's item this answer is about (several users answer one item), which matrix factorisation
    # and the collab fold-in read; None where items are not shared (a user's own posts).
    item_key: str | None = None


def _unseen(items: Sequence[HistoryRecord], known: set[str]) -> list[HistoryRecord]:
    """``items`` without those whose id is in ``known`` or came earlier in ``items``."""
    fresh = []
    for item in items:
        if item.item_id not in known:
            known.add(item.item_id)
            fresh.append(item)
    return fresh


class StoreIndex:
    """The index of one store, in the database ``location`` names: a SQLite file (a path or
    ``sqlite:///PATH``) or a ``postgresql://`` URL (``store.index_backends``). One connection behind a
    lock serves the threads of a process; other processes (a training worker, another machine) open
    their own. A location that cannot be opened raises ``StoreLocationError``."""

    def __init__(self, location: str | Path) -> None:
        self._lock = threading.RLock()
        self._backend: Backend = connect(location)
        self.where = self._backend.where  # for messages: a path, or the URL without its password
        try:
            with self.transaction() as db:
                db.prepare_schema()
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.migrate()
                db.execute(_UPSERT_META, ("schema_version", str(SCHEMA_VERSION)))
                db.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
                    (SALT_KEY, secrets.token_hex(32)),
                )
                salt = db.execute("SELECT value FROM meta WHERE key = ?", (SALT_KEY,)).fetchone()["value"]
                pending = db.execute("SELECT 1 AS found FROM tombstones WHERE compacted IS NULL").fetchall()
        except BaseException:
            self._backend.close()
            raise
        self._salt = bytes.fromhex(salt)
        self._closed = threading.Event()
        self._compactor: threading.Thread | None = None
        self.compaction_blocked: str | None = None  # why the last compaction could not finish
        if pending:  # a delete whose compaction a reader prevented, maybe in a process now gone
            self._compact_later()

    @property
    def path(self) -> Path | None:
        """The SQLite file; None for an index in PostgreSQL."""
        return getattr(self._backend, "path", None)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._backend.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Backend]:
        """One atomic unit of work: every statement inside commits together or not at all. Yields the
        backend, whose ``execute(sql, args)`` takes ``?`` placeholders on both databases."""
        with self._lock:
            self._backend.execute(self._backend.begin)
            try:
                yield self._backend
            except BaseException:
                self._backend.execute("ROLLBACK")
                raise
            self._backend.execute("COMMIT")

    def _rows(self, sql: str, *args: Any) -> list[Mapping[str, Any]]:
        with self._lock:
            return self._backend.execute(sql, args).fetchall()

    def _lock_user(self, db: Backend, user_id: str) -> None:
        """First thing inside a transaction that writes for ``user_id``: hold the user's lock until the
        commit, where the database does not already serialize every writer (``index_backends``). The
        lock is keyed by the id, so it holds for a user whose row does not exist (yet, or any more)."""
        if db.lock_user is not None:
            key = int.from_bytes(hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")
            db.execute(db.lock_user, (key - (1 << 64) if key >= 1 << 63 else key,))

    def _tombstone_of(self, user_id: str) -> str:
        """The salted hash a forgotten user is remembered by (never the id itself)."""
        return hmac.new(self._salt, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def _refuse_if_forgotten(self, db: Backend, user_id: str) -> None:
        stone = (self._tombstone_of(user_id),)
        if db.execute("SELECT 1 AS found FROM tombstones WHERE id_hash = ?", stone).fetchall():
            raise ForgottenUserError(f"user {user_id!r} was forgotten; create them again to write for them")

    def _writable(self, db: Backend, user_id: str, create: bool) -> None:
        """Inside a transaction, under the user's lock: refuse a write for a forgotten user; create a
        user that is not there when ``create`` (a module put into a plain store), else refuse it."""
        self._lock_user(db, user_id)
        self._refuse_if_forgotten(db, user_id)
        if create:
            db.execute(_ADD_USER, (user_id, time.time()))
        elif not db.execute("SELECT 1 AS found FROM users WHERE id = ?", (user_id,)).fetchall():
            raise UnknownUserError(f"no user {user_id!r} in this store")

    # ---- users -------------------------------------------------------------------------------------

    def add_user(self, user_id: str, revive: bool = True) -> bool:
        """Record ``user_id``; False when they were there already. A forgotten user is created again
        (their tombstone removed) when ``revive``, else refused with ``ForgottenUserError``."""
        with self.transaction() as db:
            self._lock_user(db, user_id)
            if revive:
                db.execute("DELETE FROM tombstones WHERE id_hash = ?", (self._tombstone_of(user_id),))
            else:
                self._refuse_if_forgotten(db, user_id)
            return db.execute(_ADD_USER, (user_id, time.time())).rowcount == 1

    def has_user(self, user_id: str) -> bool:
        return bool(self._rows("SELECT 1 AS found FROM users WHERE id = ?", user_id))

    def incarnation(self, user_id: str) -> float | None:
        """When ``user_id`` was created (None: not there): a user forgotten and created again is another
        incarnation, which must receive nothing derived from the forgotten one's data."""
        rows = self._rows("SELECT created FROM users WHERE id = ?", user_id)
        return rows[0]["created"] if rows else None

    def tombstone(self, user_id: str) -> Tombstone | None:
        """When ``user_id`` was forgotten and whether it is compacted yet; None: not forgotten."""
        rows = self._rows(
            "SELECT deleted, compacted FROM tombstones WHERE id_hash = ?", self._tombstone_of(user_id)
        )
        return Tombstone(rows[0]["deleted"], rows[0]["compacted"]) if rows else None

    def user_ids(self) -> list[str]:
        """Every user id, in code point order (sorted here: PostgreSQL's ORDER BY follows the
        database's collation, SQLite's the bytes)."""
        return sorted(row["id"] for row in self._rows("SELECT id FROM users"))

    def set_user_spec(self, user_id: str, spec: Mapping[str, Any] | None) -> None:
        """Record the module spec ``user_id`` trains with (None: the store's default)."""
        text = None if spec is None else json.dumps(dict(spec), sort_keys=True)
        with self.transaction() as db:
            self._writable(db, user_id, create=False)
            db.execute("UPDATE users SET spec = ? WHERE id = ?", (text, user_id))

    def user_spec(self, user_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT spec FROM users WHERE id = ?", user_id)
        return json.loads(rows[0]["spec"]) if rows and rows[0]["spec"] is not None else None

    # ---- store-wide settings -----------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", key)
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute(_UPSERT_META, (key, value))

    def claim_meta(self, key: str, value: str) -> str:
        """Set ``key`` to ``value`` unless it holds a value already; returns the value it holds now (the
        first writer's, when several processes claim it at once)."""
        with self.transaction() as db:
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING", (key, value))
            return db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()["value"]

    def delete_user(self, user_id: str) -> list[VersionRecord]:
        """Forget ``user_id``: every row of theirs (versions, history, keys) deleted and their tombstone
        written, in one transaction, so no later write brings them back. Returns the versions whose
        folders the caller must now remove. The deleted rows are then compacted away (``compact``);
        ``tombstone(user_id).compacted`` says when that is done."""
        with self.transaction() as db:
            self._lock_user(db, user_id)
            versions = [
                VersionRecord.from_row(row)
                for row in db.execute("SELECT * FROM versions WHERE user_id = ?", (user_id,)).fetchall()
            ]
            db.execute("DELETE FROM users WHERE id = ?", (user_id,))  # cascades to every other table
            db.execute(
                "INSERT INTO tombstones(id_hash, deleted, compacted) VALUES (?, ?, NULL) "
                "ON CONFLICT(id_hash) DO UPDATE SET deleted = excluded.deleted, compacted = NULL",
                (self._tombstone_of(user_id), time.time()),
            )
        if self.compact() is not None:
            self._compact_later()
        return versions

    def compact(self, wait: float = COMPACT_WAIT) -> str | None:
        """Make deleted rows go away from where the database keeps them (``Backend.reclaim``), waiting at
        most ``wait`` seconds for a lock. Returns None when done (every tombstone so far is then marked
        compacted), else why not: a reader that holds the index (logged, and kept in
        ``compaction_blocked``)."""
        # The deletes committed before the compaction starts are the ones it compacts (a later one's rows
        # may still be there): only those are marked compacted.
        pending = self._rows("SELECT id_hash, deleted FROM tombstones WHERE compacted IS NULL")
        since = min((row["deleted"] for row in pending), default=time.time())
        # Not under ``_lock``: the backend compacts on a connection of its own, so this process's
        # other threads keep reading and writing on the shared one meanwhile.
        blocked = self._backend.reclaim(wait, since)
        if blocked is None and pending:
            done = time.time()
            with self.transaction() as db:
                db.executemany(
                    "UPDATE tombstones SET compacted = ? WHERE id_hash = ? AND compacted IS NULL",
                    [(done, row["id_hash"]) for row in pending],
                )
        if blocked is not None and blocked != self.compaction_blocked:
            log.warning(
                "compacting the index %s after a delete is held up: %s; retrying", self.where, blocked
            )
        self.compaction_blocked = blocked
        return blocked

    def checkpoint(self) -> None:
        """Compact now, waiting as long as the database's busy timeout (a test's or a command's
        explicit wish); raises when a reader still prevents it."""
        blocked = self.compact(wait=30.0)
        if blocked is not None:
            raise RuntimeError(f"the index at {self.where} could not be compacted: {blocked}")

    def _compact_later(self) -> None:
        """Retry ``compact`` in a background thread, with growing pauses, until it succeeds or the index
        is closed."""
        with self._lock:
            if self._compactor is not None and self._compactor.is_alive():
                return
            self._compactor = threading.Thread(
                target=self._retry_compaction, name="index-compaction", daemon=True
            )
            self._compactor.start()

    def _retry_compaction(self) -> None:
        pause, longest = COMPACT_RETRY
        while not self._closed.wait(pause):
            try:
                if self.compact() is None:
                    return
            except Exception as error:  # a closed or lost connection: the next open retries
                log.warning("compacting the index %s failed: %s", self.where, error)
                if self._closed.is_set():
                    return
            pause = min(longest, pause * 2)

    # ---- module versions ---------------------------------------------------------------------------

    def add_version(self, record: VersionRecord, incarnation: float | None = None) -> VersionRecord:
        """Record a new version of ``record.user_id`` and make it current, in one transaction. The module
        folder must be complete on disk before this is called: a row never points at a missing file.
        ``record.version`` is ignored; the next number is assigned here, under the user's lock.
        ``incarnation``: the user's ``incarnation`` when the version's training read their history; if
        they were forgotten and created again since, the version is refused (``ForgottenUserError``): it
        was trained on the forgotten user's data."""
        with self.transaction() as db:
            self._writable(db, record.user_id, create=incarnation is None)
            if incarnation is not None:
                row = db.execute("SELECT created FROM users WHERE id = ?", (record.user_id,)).fetchone()
                if row is None or row["created"] != incarnation:
                    raise ForgottenUserError(
                        f"user {record.user_id!r} was forgotten since this version was trained on their data"
                    )
            latest = db.execute(
                "SELECT COALESCE(MAX(version), 0) AS latest FROM versions WHERE user_id = ?",
                (record.user_id,),
            ).fetchone()["latest"]
            stored = replace(record, version=latest + 1)
            db.execute(
                "INSERT INTO versions(user_id, version, kind, spec, base_model, base_fingerprint, created, "
                "size, sha256, data_fingerprint, metrics, folder) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.user_id,
                    stored.version,
                    stored.kind,
                    json.dumps(stored.spec, sort_keys=True),
                    stored.base_model,
                    stored.base_fingerprint,
                    stored.created,
                    stored.size,
                    stored.sha256,
                    stored.data_fingerprint,
                    json.dumps(stored.metrics, sort_keys=True),
                    stored.folder,
                ),
            )
            db.execute(
                "UPDATE users SET current_version = ? WHERE id = ?",
                (stored.version, stored.user_id),
            )
        return stored

    def versions(self, user_id: str) -> list[VersionRecord]:
        """Every stored version of ``user_id``, oldest first."""
        rows = self._rows("SELECT * FROM versions WHERE user_id = ? ORDER BY version", user_id)
        return [VersionRecord.from_row(row) for row in rows]

    def current(self, user_id: str) -> VersionRecord | None:
        rows = self._rows(
            "SELECT v.* FROM versions v JOIN users u ON u.id = v.user_id AND u.current_version = v.version "
            "WHERE u.id = ?",
            user_id,
        )
        return VersionRecord.from_row(rows[0]) if rows else None

    def set_current(self, user_id: str, version: int) -> VersionRecord:
        """Serve ``version`` of ``user_id`` from now on (a rollback, or a roll forward again)."""
        with self.transaction() as db:
            self._writable(db, user_id, create=False)
            row = db.execute(
                "SELECT * FROM versions WHERE user_id = ? AND version = ?", (user_id, version)
            ).fetchone()
            if row is None:
                known = [
                    r["version"]
                    for r in db.execute(
                        "SELECT version FROM versions WHERE user_id = ? ORDER BY version", (user_id,)
                    ).fetchall()
                ]
                raise KeyError(f"user {user_id!r} has no version {version}; stored versions: {known}")
            record = VersionRecord.from_row(row)
            db.execute(
                "UPDATE users SET current_version = ? WHERE id = ?",
                (version, user_id),
            )
        return record

    def prune(self, user_id: str, keep: int) -> list[VersionRecord]:
        """Drop all but the newest ``keep`` versions (never the current one); returns the dropped ones,
        whose folders the caller removes after this commit."""
        if keep < 1:
            raise ValueError(f"a store keeps at least 1 version per user, not {keep}")
        with self.transaction() as db:
            self._lock_user(db, user_id)
            user = db.execute("SELECT current_version FROM users WHERE id = ?", (user_id,)).fetchone()
            current = user["current_version"] if user else None
            rows = db.execute(
                "SELECT * FROM versions WHERE user_id = ? ORDER BY version DESC", (user_id,)
            ).fetchall()
            dropped = [VersionRecord.from_row(r) for r in rows[keep:] if r["version"] != current]
            db.executemany(
                "DELETE FROM versions WHERE user_id = ? AND version = ?",
                [(record.user_id, record.version) for record in dropped],
            )
        return dropped

    # ---- history -----------------------------------------------------------------------------------

    def add_history(self, user_id: str, items: Sequence[HistoryRecord], create: bool = True) -> int:
        """Append items to ``user_id``'s history (creating the user unless ``create`` is False, never
        a forgotten one); returns how many they now have."""
        return self._append_history(user_id, items, skip_known=False, create=create)[1]

    def add_unseen_history(self, user_id: str, items: Sequence[HistoryRecord], create: bool = True) -> int:
        """Append the items whose id ``user_id``'s history does not hold yet (a repeat within ``items``
        counts once), creating the user unless ``create`` is False (never a forgotten one); returns how
        many were added. Checked and written in one transaction, so importing the same data twice, or a
        retried request, adds nothing."""
        return self._append_history(user_id, items, skip_known=True, create=create)[0]

    def _append_history(
        self, user_id: str, items: Sequence[HistoryRecord], skip_known: bool, create: bool
    ) -> tuple[int, int]:
        """(items added, items the user now has)."""
        with self.transaction() as db:
            self._writable(db, user_id, create)
            count = db.execute(
                "SELECT COUNT(*) AS count FROM history WHERE user_id = ?", (user_id,)
            ).fetchone()["count"]
            if skip_known:
                known = db.execute("SELECT item_id FROM history WHERE user_id = ?", (user_id,)).fetchall()
                items = _unseen(items, {row["item_id"] for row in known})
            db.executemany(
                "INSERT INTO history(user_id, seq, item_id, input, target, split, time, fields, item_key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        user_id,
                        count + i,
                        it.item_id,
                        it.input,
                        it.target,
                        it.split,
                        it.time,
                        json.dumps(dict(it.fields), sort_keys=True),
                        it.item_key,
                    )
                    for i, it in enumerate(items)
                ],
            )
            return len(items), count + len(items)

    def history(self, user_id: str) -> list[HistoryRecord]:
        rows = self._rows("SELECT * FROM history WHERE user_id = ? ORDER BY seq", user_id)
        return [
            HistoryRecord(
                r["item_id"],
                r["input"],
                r["target"],
                r["split"],
                r["time"],
                json.loads(r["fields"]),
                r["item_key"],
            )
            for r in rows
        ]

    # ---- API keys (hashes only) --------------------------------------------------------------------

    def add_key(self, key_hash: str, user_id: str | None, role: str, label: str | None = None) -> None:
        """Record a key by its hash: ``user_id`` None for an admin key. The key itself is never stored. A
        user key needs the user to exist (``UnknownUserError``, ``ForgottenUserError``)."""
        with self.transaction() as db:
            if user_id is not None:
                self._writable(db, user_id, create=False)
            db.execute(
                "INSERT INTO keys(key_hash, user_id, role, created, label) VALUES (?, ?, ?, ?, ?)",
                (key_hash, user_id, role, time.time(), label),
            )

    def revoke_keys(self, user_id: str) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM keys WHERE user_id = ?", (user_id,)).rowcount

    def find_key(self, key_hash: str) -> KeyRecord | None:
        """The whole record of a key hash, or None for an unknown or revoked key."""
        rows = self._rows("SELECT * FROM keys WHERE key_hash = ?", key_hash)
        return KeyRecord(**dict(rows[0])) if rows else None

    def keys_of(self, user_id: str | None) -> list[KeyRecord]:
        """The keys of ``user_id``, or the admin keys for None, oldest first (ties by hash, in code point
        order on both databases)."""
        if user_id is None:
            rows = self._rows("SELECT * FROM keys WHERE user_id IS NULL")
        else:
            rows = self._rows("SELECT * FROM keys WHERE user_id = ?", user_id)
        records = [KeyRecord(**dict(row)) for row in rows]
        return sorted(records, key=lambda record: (record.created, record.key_hash))

    def revoke_key(self, key_hash: str) -> bool:
        """Revoke one key; False when no key has this hash."""
        with self.transaction() as db:
            return db.execute("DELETE FROM keys WHERE key_hash = ?", (key_hash,)).rowcount == 1

    def revoke_admin_keys(self) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM keys WHERE user_id IS NULL").rowcount
