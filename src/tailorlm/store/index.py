"""The store's index: one SQLite database beside the module folders, the one record of which users exist,
their module versions, their history items and their API keys (as hashes).

Why SQLite: embedded (nothing to start), transactional, safe for several processes (the server and a
training worker) with WAL and a busy timeout. Forgetting a user must leave nothing of them behind, so
``secure_delete`` overwrites deleted rows in the file and the WAL is checkpointed and truncated after a
delete.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

INDEX_FILE = "index.sqlite3"
SCHEMA_VERSION = 2  # 2: users.spec (a user's own module spec)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    current_version INTEGER,
    data_fingerprint TEXT,
    spec TEXT
);
CREATE TABLE IF NOT EXISTS versions (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    base_model TEXT,
    base_fingerprint TEXT,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
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
    time REAL,
    fields TEXT NOT NULL,
    PRIMARY KEY (user_id, seq)
);
CREATE TABLE IF NOT EXISTS keys (
    key_hash TEXT PRIMARY KEY,
    user_id TEXT REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    created REAL NOT NULL,
    label TEXT
);
"""


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
    def from_row(cls, row: sqlite3.Row) -> VersionRecord:
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


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an index written by an older version up to this schema; every step is additive."""
    columns = {row["name"] for row in db.execute("PRAGMA table_info(users)")}
    if "spec" not in columns:  # schema 1 had no per-user spec
        db.execute("ALTER TABLE users ADD COLUMN spec TEXT")


@dataclass(frozen=True)
class HistoryRecord:
    """One item of a user's history: what retrieval, profiles and retraining read."""

    item_id: str
    input: str
    target: str
    split: str = "train"
    time: float | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)


def _unseen(items: Sequence[HistoryRecord], known: set[str]) -> list[HistoryRecord]:
    """``items`` without those whose id is in ``known`` or came earlier in ``items``."""
    fresh = []
    for item in items:
        if item.item_id not in known:
            known.add(item.item_id)
            fresh.append(item)
    return fresh


class StoreIndex:
    """The SQLite index of one store. One connection behind a lock serves the threads of a process;
    other processes (a training worker) open their own, and WAL lets readers run beside a writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # isolation_level=None: transactions are explicit (``transaction``), nothing is begun implicitly.
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # A deleted row's bytes are overwritten in the file, so a forgotten user's text is gone from it,
        # not merely unlinked from the b-tree.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA synchronous=FULL")
        with self.transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            _migrate(db)
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work: every statement inside commits together or not at all."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- users -------------------------------------------------------------------------------------

    def add_user(self, user_id: str) -> bool:
        """Record ``user_id``; False when they were there already."""
        with self.transaction() as db:
            return (
                db.execute(
                    "INSERT OR IGNORE INTO users(id, created) VALUES (?, ?)", (user_id, time.time())
                ).rowcount
                == 1
            )

    def has_user(self, user_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM users WHERE id = ?", user_id))

    def user_ids(self) -> list[str]:
        return [row["id"] for row in self._rows("SELECT id FROM users ORDER BY id")]

    def set_user_spec(self, user_id: str, spec: Mapping[str, Any] | None) -> None:
        """Record the module spec ``user_id`` trains with (None: the store's default)."""
        text = None if spec is None else json.dumps(dict(spec), sort_keys=True)
        with self.transaction() as db:
            if not db.execute("UPDATE users SET spec = ? WHERE id = ?", (text, user_id)).rowcount:
                raise KeyError(f"no user {user_id!r} in this store")

    def user_spec(self, user_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT spec FROM users WHERE id = ?", user_id)
        return json.loads(rows[0]["spec"]) if rows and rows[0]["spec"] is not None else None

    # ---- store-wide settings -----------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", key)
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def delete_user(self, user_id: str) -> list[VersionRecord]:
        """Forget ``user_id``: every row of theirs (versions, history, keys, jobs) in one transaction, then
        the write-ahead log folded into the file and truncated, so no copy of their rows stays in it.
        Returns the versions whose folders the caller must now remove."""
        with self.transaction() as db:
            versions = [
                VersionRecord.from_row(row)
                for row in db.execute("SELECT * FROM versions WHERE user_id = ?", (user_id,))
            ]
            db.execute("DELETE FROM users WHERE id = ?", (user_id,))  # cascades to every other table
        self.checkpoint()
        return versions

    def checkpoint(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ---- module versions ---------------------------------------------------------------------------

    def add_version(self, record: VersionRecord) -> VersionRecord:
        """Record a new version of ``record.user_id`` and make it current, in one transaction. The module
        folder must be complete on disk before this is called: a row never points at a missing file.
        ``record.version`` is ignored; the next number is assigned here."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO users(id, created) VALUES (?, ?)", (record.user_id, time.time())
            )
            (latest,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM versions WHERE user_id = ?", (record.user_id,)
            ).fetchone()
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
                "UPDATE users SET current_version = ?, data_fingerprint = ? WHERE id = ?",
                (stored.version, stored.data_fingerprint, stored.user_id),
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
            row = db.execute(
                "SELECT * FROM versions WHERE user_id = ? AND version = ?", (user_id, version)
            ).fetchone()
            if row is None:
                known = [
                    r[0] for r in db.execute("SELECT version FROM versions WHERE user_id = ?", (user_id,))
                ]
                raise KeyError(f"user {user_id!r} has no version {version}; stored versions: {known}")
            record = VersionRecord.from_row(row)
            db.execute(
                "UPDATE users SET current_version = ?, data_fingerprint = ? WHERE id = ?",
                (version, record.data_fingerprint, user_id),
            )
        return record

    def prune(self, user_id: str, keep: int) -> list[VersionRecord]:
        """Drop all but the newest ``keep`` versions (never the current one); returns the dropped ones,
        whose folders the caller removes after this commit."""
        if keep < 1:
            raise ValueError(f"a store keeps at least 1 version per user, not {keep}")
        with self.transaction() as db:
            (current,) = db.execute(
                "SELECT current_version FROM users WHERE id = ?", (user_id,)
            ).fetchone() or (None,)
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

    def add_history(self, user_id: str, items: Sequence[HistoryRecord]) -> int:
        """Append items to ``user_id``'s history (creating the user); returns how many they now have."""
        return self._append_history(user_id, items, skip_known=False)[1]

    def add_unseen_history(self, user_id: str, items: Sequence[HistoryRecord]) -> int:
        """Append the items whose id ``user_id``'s history does not hold yet (a repeat within ``items``
        counts once), creating the user; returns how many were added. Checked and written in one
        transaction, so importing the same data twice, or a retried request, adds nothing."""
        return self._append_history(user_id, items, skip_known=True)[0]

    def _append_history(
        self, user_id: str, items: Sequence[HistoryRecord], skip_known: bool
    ) -> tuple[int, int]:
        """(items added, items the user now has)."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO users(id, created) VALUES (?, ?)", (user_id, time.time()))
            (count,) = db.execute("SELECT COUNT(*) FROM history WHERE user_id = ?", (user_id,)).fetchone()
            if skip_known:
                known = db.execute("SELECT item_id FROM history WHERE user_id = ?", (user_id,))
                items = _unseen(items, {row[0] for row in known})
            db.executemany(
                "INSERT INTO history(user_id, seq, item_id, input, target, split, time, fields) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
                    )
                    for i, it in enumerate(items)
                ],
            )
            return len(items), count + len(items)

    def history(self, user_id: str) -> list[HistoryRecord]:
        rows = self._rows("SELECT * FROM history WHERE user_id = ? ORDER BY seq", user_id)
        return [
            HistoryRecord(
                r["item_id"], r["input"], r["target"], r["split"], r["time"], json.loads(r["fields"])
            )
            for r in rows
        ]

    # ---- API keys (hashes only) --------------------------------------------------------------------

    def add_key(self, key_hash: str, user_id: str | None, role: str, label: str | None = None) -> None:
        """Record a key by its hash: ``user_id`` None for an admin key. The key itself is never stored."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO keys(key_hash, user_id, role, created, label) VALUES (?, ?, ?, ?, ?)",
                (key_hash, user_id, role, time.time(), label),
            )

    def key(self, key_hash: str) -> tuple[str | None, str] | None:
        """(user id, role) of a key hash, or None for an unknown or revoked key."""
        rows = self._rows("SELECT user_id, role FROM keys WHERE key_hash = ?", key_hash)
        return (rows[0]["user_id"], rows[0]["role"]) if rows else None

    def revoke_keys(self, user_id: str) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM keys WHERE user_id = ?", (user_id,)).rowcount

    def find_key(self, key_hash: str) -> KeyRecord | None:
        """The whole record of a key hash, or None for an unknown or revoked key."""
        rows = self._rows("SELECT * FROM keys WHERE key_hash = ?", key_hash)
        return KeyRecord(**dict(rows[0])) if rows else None

    def keys_of(self, user_id: str | None) -> list[KeyRecord]:
        """The keys of ``user_id``, or the admin keys for None, oldest first."""
        if user_id is None:
            rows = self._rows("SELECT * FROM keys WHERE user_id IS NULL ORDER BY created, key_hash")
        else:
            rows = self._rows("SELECT * FROM keys WHERE user_id = ? ORDER BY created, key_hash", user_id)
        return [KeyRecord(**dict(row)) for row in rows]

    def revoke_key(self, key_hash: str) -> bool:
        """Revoke one key; False when no key has this hash."""
        with self.transaction() as db:
            return db.execute("DELETE FROM keys WHERE key_hash = ?", (key_hash,)).rowcount == 1

    def revoke_admin_keys(self) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM keys WHERE user_id IS NULL").rowcount
