"""Where each user's module lives: versioned module folders under a root, recorded in an SQLite index
(``store.index``). The one owner of folder naming, versions, completeness and atomic writes; the trainer,
the benchmark setups and the server read and write modules only through it.

Layout: ``root/index.sqlite3`` and ``root/<user folder>/<version folder>/`` (``store.module_folder``'s
files). A put writes a new version folder under a fresh name (staged, fsynced, renamed), then records it
in one index transaction; a crash at any instant leaves the old version or the new one, never a row
without its folder. A folder the index does not record (a put killed before its row) is not a module and
is removed by the next put of that user. Every read checks the weights' sha256 against the index."""

from __future__ import annotations

import hashlib
import re
import shutil
import time
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from tailorlm import kinds
from tailorlm.kinds import ModuleSpec
from tailorlm.store import module_folder
from tailorlm.store.index import INDEX_FILE, StoreIndex, VersionRecord
from tailorlm.store.module_folder import ModuleFileError, StoredModule

DEFAULT_KEEP = 3  # versions kept per user; older ones are pruned (rollback reaches the kept ones)
_HASHED = re.compile(r".*-[0-9a-f]{8}")  # how a name that got a hash ends


def folder_name(user_id: str) -> str:
    """A filesystem-safe folder name per user id; ids that needed changing get a hash so they stay
    distinct (``a/b`` and ``a_b`` do not share a folder), and no id can name a path outside the root.

    An id keeps its own name only when that is unambiguous: unchanged by the cleaning, not empty (that
    would be the root itself), not hidden (staging folders are) and not spelled like a hashed name (which
    could be another id's: ``a_b-07f4401c`` is where ``a/b`` lives), and not the index's own files
    (``index.sqlite3`` and its ``-wal``/``-shm`` siblings share the root with the user folders)."""
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
    """Users' modules under ``root``: the current version of each, the last ``keep`` versions kept."""

    def __init__(self, root: str | Path, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError(f"a store keeps at least 1 version per user, not {keep}")
        self.root = Path(root)
        self.keep = keep
        self._index: StoreIndex | None = None

    @property
    def index(self) -> StoreIndex:
        """Opened on first use, so asking an empty root creates nothing."""
        if self._index is None:
            self._index = StoreIndex(self.root / INDEX_FILE)
        return self._index

    def _exists(self) -> bool:
        return self._index is not None or (self.root / INDEX_FILE).is_file()

    def user_folder(self, user_id: str) -> Path:
        return self.root / folder_name(user_id)

    def current(self, user_id: str) -> VersionRecord | None:
        return self.index.current(user_id) if self._exists() else None

    def folder(self, user_id: str, version: int | None = None) -> Path:
        """The folder of ``user_id``'s current (or a given) version."""
        return self.root / self._record(user_id, version).folder

    def has(self, user_id: str) -> bool:
        """Whether a module is stored for ``user_id`` (a put killed before its index row left none)."""
        record = self.current(user_id)
        return record is not None and (self.root / record.folder / module_folder.WEIGHTS_FILE).is_file()

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
        home = self.user_folder(user_id)
        self._remove_unrecorded(user_id, home)
        folder = home / f"v{time.time_ns():x}-{uuid.uuid4().hex[:8]}"  # unique: never replaces a folder
        stored = StoredModule(spec, dict(tensors), {**(meta or {}), "user": user_id})
        module_folder.write_module(stored, folder, model=model, base_name=base_name)
        weights = folder / module_folder.WEIGHTS_FILE
        record = self.index.add_version(
            VersionRecord(
                user_id=user_id,
                version=0,
                kind=spec.kind,
                spec=kinds.spec_to_dict(spec),
                base_model=base_name,
                base_fingerprint=None,
                created=time.time(),
                size=module_folder.module_bytes(folder),
                sha256=sha256_of(weights),
                data_fingerprint=data_fingerprint,
                metrics={
                    k: v for k, v in (meta or {}).items() if k in ("val_losses", "train_losses", "best_epoch")
                },
                folder=folder.relative_to(self.root).as_posix(),
            )
        )
        for dropped in self.index.prune(user_id, self.keep):
            shutil.rmtree(self.root / dropped.folder, ignore_errors=True)
        return record

    def get(self, user_id: str, version: int | None = None) -> StoredModule:
        """The current (or a given) version, its weights checked against the sha256 the index holds."""
        record = self._record(user_id, version)
        folder = self.root / record.folder
        weights = folder / module_folder.WEIGHTS_FILE
        if not weights.is_file():
            raise ModuleFileError(f"user {user_id!r} version {record.version}: {weights} is missing")
        if sha256_of(weights) != record.sha256:
            raise ModuleFileError(
                f"user {user_id!r} version {record.version}: {weights} does not match its checksum "
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
            raise ModuleFileError(f"no {which} is stored for user {user_id!r} under {self.root}")
        return record

    def versions(self, user_id: str) -> list[VersionRecord]:
        return self.index.versions(user_id) if self._exists() else []

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
                    f"{self.folder(user_id)} holds a {kinds.spec_to_dict(stored.spec)} module; this bank "
                    f"holds {kinds.spec_to_dict(spec)}"
                )
            return kinds.of(spec).normalize_names(stored.tensors)

        return load

    def users(self) -> list[str]:
        """Users with a current module."""
        if not self._exists():
            return []
        return [user for user in self.index.user_ids() if self.index.current(user) is not None]

    def delete(self, user_id: str) -> None:
        """Forget ``user_id``: their index rows (overwritten, the WAL truncated) and every folder."""
        if self._exists():
            self.index.delete_user(user_id)
        shutil.rmtree(self.user_folder(user_id), ignore_errors=True)

    def _remove_unrecorded(self, user_id: str, home: Path) -> None:
        """Version folders of ``user_id`` the index does not name: left by a put killed before its row."""
        if not home.is_dir():
            return
        recorded = {(self.root / v.folder).name for v in self.versions(user_id)}
        for child in home.iterdir():
            if child.is_dir() and child.name not in recorded:
                shutil.rmtree(child, ignore_errors=True)

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
