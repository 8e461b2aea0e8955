"""Where each user's module lives: versioned module folders under a root, recorded in an index
(``store.index``: the root's own SQLite file by default, or PostgreSQL, found as ``store.location``
says). The one owner of folder naming, versions, completeness and atomic writes; the trainer, the
benchmark setups and the server read and write modules only through it.

Layout: ``root/index.sqlite3`` (or ``root/.store.json`` naming the index) and
``root/u-<sha256 of the user id>/<version folder>/`` (``store.module_folder``'s files; ``folder_name``).
Stores written before that naming keep their old version folders where they are: the index names each
version's folder, so they are read in place, and a user's next version goes to the new folder.
The root is a folder, or an fsspec URL whose files ``store.roots`` reaches. A put writes a new version
folder under a fresh name
(staged, fsynced, renamed; or uploaded), then records it in one index transaction; a crash at any
instant leaves the old version or the new one, never a row without its folder. A folder the index does
not record (a put killed before its row) is not a module and is removed by a later put of that user,
once it is old enough not to be another process's put still under way. Every read checks the weights'
sha256 against the index."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

import torch

from tailorlm import kinds
from tailorlm.kinds import ModuleSpec
from tailorlm.store import location, module_folder, roots
from tailorlm.store.index import INDEX_FILE, ForgottenUserError, StoreIndex, VersionRecord
from tailorlm.store.module_folder import ModuleFileError, StoredModule

DEFAULT_KEEP = 3  # versions kept per user; older ones are pruned (rollback reaches the kept ones)
USER_FOLDER_PREFIX = "u-"
# What of a module's meta its index row keeps: its training curve, and for a fold-in kind the fingerprint
# of the items it was folded in against (a later swap of them shows the user stale).
KEPT_METRICS = ("val_losses", "train_losses", "best_epoch", "folded_against")
_HASHED = re.compile(r".*-[0-9a-f]{8}")  # how a legacy name that got a checksum ends
# A version folder's name starts with when its put began (``v<time_ns hex>-``; its staging folder with
# ``.v<time_ns hex>-``). One the index does not name is removed only this long after: until then it may
# be a put of another process (a training worker, another machine) that has not recorded it yet.
_STARTED = re.compile(r"\.?v([0-9a-f]+)-")
UNRECORDED_GRACE = 3600.0  # seconds


def folder_name(user_id: str) -> str:
    """The folder of ``user_id``: ``u-`` and the full sha256 of the id (64 hex digits). One id, one
    folder: two ids share a folder only if their sha256 collide. The name has one length and one case
    whatever the id (a case-insensitive filesystem or a long id cannot merge two users), is never hidden
    (staging and cache folders are), is never the index's files, and can name nothing outside the root."""
    return USER_FOLDER_PREFIX + hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


def legacy_folder_name(user_id: str) -> str:
    """Where stores written before ``folder_name`` hashed every id kept ``user_id``'s folders: the id
    cleaned and cut to 80 characters, plus a 32-bit checksum when it changed. Different ids can map to
    the same name, so it is only ever read (an old version's folder, which the index names whole) or
    removed when nothing of any user is left in it; nothing new is written there."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:80]
    reserved = safe.lower().startswith(INDEX_FILE)
    if safe != user_id or not safe or safe.startswith(".") or _HASHED.fullmatch(safe) or reserved:
        safe = f"{safe.lstrip('.')}-{zlib.crc32(user_id.encode()):08x}"
    return safe


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModuleStore:
    """Users' modules under ``root`` (a folder, or an fsspec URL such as ``s3://bucket/store``): the
    current version of each, the last ``keep`` versions kept. ``index`` None: the index the root records
    (or ``TAILORLM_INDEX_URL``, or the root's own SQLite file); a ``postgresql://`` URL or a SQLite path
    puts a new store's index there (``store.location``)."""

    def __init__(self, root: str | Path, keep: int = DEFAULT_KEEP, index: str | None = None) -> None:
        if keep < 1:
            raise ValueError(f"a store keeps at least 1 version per user, not {keep}")
        self.files = roots.open_root(root)
        self.keep = keep
        self._asked_index = index
        self._index: StoreIndex | None = None
        # Called before each write is recorded: a training worker's check that the server that started
        # it still runs (it raises or exits if not), so an orphan never writes.
        self.write_guard: Callable[[], None] | None = None
        # user id -> the incarnation (``StoreIndex.incarnation``) a training read their data from: a put
        # for them is recorded only if they are still that incarnation (not forgotten, or created anew).
        self.incarnations: dict[str, float] = {}

    @property
    def root(self) -> Path:
        """The root folder on this machine; a store under a URL has none (``location`` names it)."""
        return self.files.local("")

    @property
    def location(self) -> str:
        """The root as given (a folder or a URL): what another process opens the same store by."""
        return self.files.location

    @property
    def index(self) -> StoreIndex:
        """Opened on first use, so asking an empty root creates nothing."""
        if self._index is None:
            self._index = location.open_index(self.files, self._asked_index)
        return self._index

    def exists(self) -> bool:
        """Whether a store was created here (asking a root that holds none creates nothing)."""
        return self._index is not None or location.exists(self.files)

    def user_folder(self, user_id: str) -> Path:
        return self.files.local(folder_name(user_id))

    def current(self, user_id: str) -> VersionRecord | None:
        return self.index.current(user_id) if self.exists() else None

    def folder(self, user_id: str, version: int | None = None) -> Path:
        """The folder of ``user_id``'s current (or a given) version, on a root on this machine."""
        return self.files.local(self._record(user_id, version).folder)

    def has(self, user_id: str) -> bool:
        """Whether a module is stored for ``user_id`` (a put killed before its index row left none)."""
        record = self.current(user_id)
        return record is not None and self.files.is_file(f"{record.folder}/{module_folder.WEIGHTS_FILE}")

    def put(
        self,
        user_id: str,
        spec: ModuleSpec,
        tensors: Mapping[str, torch.Tensor],
        *,
        model: torch.nn.Module,
        base_name: str | None,
        meta: Mapping | None = None,
        data_fingerprint: str | None = None,
    ) -> VersionRecord:
        """Store a new version of ``user_id``'s module and make it current; older versions beyond
        ``keep`` are removed after the index no longer names them."""
        # Unique, so it never replaces a folder; it starts with when the put began (``_STARTED``).
        relative = f"{folder_name(user_id)}/v{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
        stored = StoredModule(spec, dict(tensors), {**(meta or {}), "user": user_id})
        try:
            self._remove_unrecorded(user_id)
            with self.files.new_folder(relative) as folder:
                module_folder.write_module(stored, folder, model=model, base_name=base_name)
                size = module_folder.module_bytes(folder)
                sha256 = sha256_of(folder / module_folder.WEIGHTS_FILE)
        except Exception:  # an OSError, or the writer's own error type (safetensors has its own)
            # Forgetting the user removes their folder, a put's half-written version with it: then the
            # put fails as any write for a forgotten user does.
            self.files.remove(relative)
            if self.exists() and self.index.tombstone(user_id) is not None:
                raise ForgottenUserError(
                    f"user {user_id!r} was forgotten while their module was written"
                ) from None
            raise
        try:
            if self.write_guard is not None:
                self.write_guard()
            record = self._record_version(
                user_id, spec, base_name, meta, data_fingerprint, relative, size, sha256
            )
        except BaseException:
            # Not recorded (the user was forgotten meanwhile, or the write was stopped): not a module.
            self.files.remove(relative)
            self.files.remove_if_empty(folder_name(user_id))
            raise
        for dropped in self.index.prune(user_id, self.keep):
            self.files.remove(dropped.folder)
        return record

    def _record_version(
        self,
        user_id: str,
        spec: ModuleSpec,
        base_name: str | None,
        meta: Mapping | None,
        data_fingerprint: str | None,
        relative: str,
        size: int,
        sha256: str,
    ) -> VersionRecord:
        """The index row of a version folder just written; ``UnknownUserError`` (``ForgottenUserError``)
        when the user was forgotten."""
        return self.index.add_version(
            VersionRecord(
                user_id=user_id,
                version=0,
                kind=spec.kind,
                spec=kinds.spec_to_dict(spec),
                base_model=base_name,
                base_fingerprint=None,
                created=time.time(),
                size=size,
                sha256=sha256,
                data_fingerprint=data_fingerprint,
                metrics={k: v for k, v in (meta or {}).items() if k in KEPT_METRICS},
                folder=relative,
            ),
            incarnation=self.incarnations.get(user_id),
        )

    def get(self, user_id: str, version: int | None = None) -> StoredModule:
        """The current (or a given) version, its weights checked against the sha256 the index holds."""
        record = self._record(user_id, version)
        where = self.files.describe(f"{record.folder}/{module_folder.WEIGHTS_FILE}")
        with self.files.reading(record.folder) as folder:
            weights = folder / module_folder.WEIGHTS_FILE
            if not weights.is_file():
                raise ModuleFileError(f"user {user_id!r} version {record.version}: {where} is missing")
            if sha256_of(weights) != record.sha256:
                raise ModuleFileError(
                    f"user {user_id!r} version {record.version}: {where} does not match its checksum "
                    "(changed or damaged on disk); roll back to another version or retrain the user"
                )
            return module_folder.read_module(folder)

    def _record(self, user_id: str, version: int | None = None) -> VersionRecord:
        if version is None:
            record = self.current(user_id)
        else:
            record = next((v for v in self.versions(user_id) if v.version == version), None)
        if record is None:
            which = "module" if version is None else f"version {version}"
            raise ModuleFileError(f"no {which} is stored for user {user_id!r} under {self.location}")
        return record

    def versions(self, user_id: str) -> list[VersionRecord]:
        return self.index.versions(user_id) if self.exists() else []

    def rollback(self, user_id: str, version: int | None = None) -> VersionRecord:
        """Serve an earlier version again: ``version``, or the one before the current."""
        current = self._record(user_id)
        if version is None:
            older = [v.version for v in self.versions(user_id) if v.version < current.version]
            if not older:
                raise ModuleFileError(
                    f"user {user_id!r} has no version before {current.version} to roll back to"
                )
            version = older[-1]
        return self.index.set_current(user_id, version)

    def loader(self, spec: ModuleSpec):
        """A function user id -> tensors in ``spec``'s bank layout, for ``SlotManager``: a stored module
        of another layout is an error naming its folder."""

        def load(user_id: str) -> dict[str, torch.Tensor]:
            stored = self.get(user_id)
            if not kinds.same_layout(stored.spec, spec):
                raise ModuleFileError(
                    f"{self.files.describe(self._record(user_id).folder)} holds a "
                    f"{kinds.spec_to_dict(stored.spec)} module; this bank "
                    f"holds {kinds.spec_to_dict(spec)}"
                )
            return kinds.of(spec).normalize_names(stored.tensors)

        return load

    def users(self) -> list[str]:
        """Users with a current module."""
        if not self.exists():
            return []
        return [user for user in self.index.user_ids() if self.index.current(user) is not None]

    def delete(self, user_id: str) -> str | None:
        """Forget ``user_id``: their index rows (with a tombstone that refuses later writes for them, and
        compacted: ``StoreIndex.delete_user``) and every folder, on whatever filesystem the root is. A
        legacy folder (``legacy_folder_name``) may be shared with another user: only this user's versions
        are removed from it, and it goes once it is empty. Returns None when the index is compacted
        already, else why not yet (it is retried in the background)."""
        if not self.exists():
            self.files.remove(folder_name(user_id))
            return None
        versions = self.index.delete_user(user_id)
        for record in versions:
            self.files.remove(record.folder)
        self.files.remove(folder_name(user_id))
        legacy = legacy_folder_name(user_id)
        if not any(not name.startswith(".") for name in self.files.folders(legacy)):
            self.files.remove(legacy)  # only staging leftovers (hidden) were left in it
        return self.index.compaction_blocked

    def _remove_unrecorded(self, user_id: str) -> None:
        """Version folders of ``user_id`` the index does not name, left by a put killed before its row
        (and past ``UNRECORDED_GRACE``, so not a put another process is making now)."""
        home = folder_name(user_id)
        recorded = {PurePosixPath(v.folder).name for v in self.versions(user_id)}
        for name in self.files.folders(home):
            if name not in recorded and _abandoned(name):
                self.files.remove(f"{home}/{name}")

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None


def _abandoned(name: str) -> bool:
    """Whether an unrecorded version folder is older than ``UNRECORDED_GRACE`` (a name that does not say
    when it was made is not a put under way)."""
    started = _STARTED.match(name)
    return started is None or time.time_ns() - int(started.group(1), 16) > UNRECORDED_GRACE * 1e9
