"""Where each user's module lives: one folder per user under a root, written atomically, with a record
of whether it is complete. The one owner of folder naming and completeness; the trainer, the benchmark
setups and (later) the server read and write modules only through it."""

from __future__ import annotations

import re
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from tailorlm.kinds import ModuleSpec
from tailorlm.store import module_folder
from tailorlm.store.module_folder import ModuleFileError, StoredModule

COMPLETE = "complete"  # the key in a module's tailorlm.json that marks a finished module
_HASHED = re.compile(r".*-[0-9a-f]{8}")  # how a name that got a hash ends


def folder_name(user_id: str) -> str:
    """A filesystem-safe folder name per user id; ids that needed changing get a hash so they stay
    distinct (``a/b`` and ``a_b`` do not share a folder), and no id can name a path outside the root.

    An id keeps its own name only when that is unambiguous: unchanged by the cleaning, not empty (that
    would be the root itself), not hidden (staging folders are) and not spelled like a hashed name (which
    could be another id's: ``a_b-07f4401c`` is where ``a/b`` lives)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:80]
    if safe != user_id or not safe or safe.startswith(".") or _HASHED.fullmatch(safe):
        safe = f"{safe.lstrip('.')}-{zlib.crc32(user_id.encode()):08x}"
    return safe


class ModuleStore:
    """User modules under ``root``, one folder each (see ``store.module_folder`` for a folder's files)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, user_id: str) -> Path:
        return self.root / folder_name(user_id)

    def has(self, user_id: str) -> bool:
        """Whether a complete module is stored for ``user_id`` (a job killed mid-write leaves none)."""
        meta = self.folder(user_id) / module_folder.META_FILE
        if not meta.is_file():
            return False
        try:
            return bool(module_folder.read_json(meta).get(COMPLETE))
        except ModuleFileError:
            return False

    def put(
        self,
        user_id: str,
        spec: ModuleSpec,
        tensors: Mapping[str, torch.Tensor],
        *,
        model: torch.nn.Module,
        base_name: str | None,
        meta: Mapping | None = None,
    ) -> Path:
        """Store ``user_id``'s module, replacing the old one atomically, marked complete."""
        # The id it is put under is the one recorded, whatever ``meta`` says: ``users`` reads it back.
        stored = StoredModule(spec, dict(tensors), {**(meta or {}), "user": user_id, COMPLETE: True})
        return module_folder.write_module(stored, self.folder(user_id), model=model, base_name=base_name)

    def get(self, user_id: str) -> StoredModule:
        self._need(user_id)
        return module_folder.read_module(self.folder(user_id))

    def _need(self, user_id: str) -> None:
        if not self.has(user_id):
            raise ModuleFileError(f"no complete module is stored for user {user_id!r} under {self.root}")

    def loader(self, spec: ModuleSpec):
        """A function user id -> tensors in ``spec``'s bank layout, for ``SlotManager``: a stored module
        of another layout is an error naming its folder."""

        def load(user_id: str) -> dict[str, torch.Tensor]:
            self._need(user_id)
            return module_folder.read_for(spec, self.folder(user_id)).tensors

        return load

    def users(self) -> list[str]:
        """Users with a complete module, by the id recorded in it. Only a user's own folder counts: a
        staging folder a killed write left behind (``.ann.x1y2``, see ``files.atomic_folder``) holds a
        complete-looking copy too."""
        if not self.root.is_dir():
            return []
        found = []
        for meta in sorted(self.root.glob(f"*/{module_folder.META_FILE}")):
            try:
                record = module_folder.read_json(meta)
            except ModuleFileError:
                continue
            user = record.get("user")
            if record.get(COMPLETE) and isinstance(user, str) and meta.parent.name == folder_name(user):
                found.append(user)
        return found

    def delete(self, user_id: str) -> None:
        shutil.rmtree(self.folder(user_id), ignore_errors=True)
