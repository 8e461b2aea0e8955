"""Writing files so that a reader, or a job resumed after a kill, never sees half of one; JSON text that
strict readers accept."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block succeeds its files are flushed to
    disk and it replaces ``target`` in one rename, when it fails ``target`` is left as it was. (Replacing
    an existing ``target`` removes it first: a crash in between leaves none; a store that must never lose
    a module writes every version to a new folder instead.)"""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        _fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and the folder itself, so the rename that follows publishes
    complete files even across a power cut."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_text(path: Path, text: str, private: bool = False) -> None:
    """Write ``text`` to ``path`` through a staging file renamed over it. ``private``: the file (and any
    folder made for it) is the owner's alone, whatever the umask (``PRIVATE_FILE``)."""
    if private:
        private_folder(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    if private:
        # Created 0600 (O_CREAT's mode), and fchmod for a staging file a killed writer left behind.
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), PRIVATE_FILE)
            handle.write(text)
    else:
        staging.write_text(text, encoding="utf-8")
    staging.replace(path)


# What a store's files and folders get: owner-only, since they hold users' history, keys and modules.
PRIVATE_FILE = 0o600
PRIVATE_FOLDER = 0o700


def private_folder(folder: Path) -> Path:
    """Make ``folder`` and every missing parent, owner-only (``mkdir(parents=True)`` gives the missing
    parents the umask's mode, not the one asked for). Existing folders are left as they are."""
    missing = []
    for level in [folder, *folder.parents]:
        if level.exists():
            break
        missing.append(level)
    for level in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it in between
            level.mkdir(mode=PRIVATE_FOLDER)
            os.chmod(level, PRIVATE_FOLDER)  # the mode passed to mkdir is masked by the umask
    return folder


def make_private(path: Path) -> None:
    """Make ``path`` (a file, or a folder and everything below it) owner-only."""
    if path.is_dir():
        for below in path.rglob("*"):
            os.chmod(below, PRIVATE_FOLDER if below.is_dir() else PRIVATE_FILE)
        os.chmod(path, PRIVATE_FOLDER)
    elif path.exists():
        os.chmod(path, PRIVATE_FILE)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def json_text(payload: dict) -> str:
    """``payload`` as indented JSON: numpy and torch scalars as numbers, paths as strings, NaN and
    infinity as null (strict JSON readers refuse them)."""
    return json.dumps(_jsonable(payload), indent=2, sort_keys=False)
