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


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


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
