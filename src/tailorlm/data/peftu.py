"""PEFT-U task folders: ``user_data_leaked.json`` (or ``user_data_no_leak.json``).

The file maps ``{user_id: {"train"|"val"|"test": {sample_id: {"text": str, "label": [str, ...]}}}}``; the
splits in the file are PEFT-U's own (80/10/10, stratified, seed 42) and are kept as they are. A sample id
names the same text for every user who labelled it, so it becomes the example's ``item_key``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tailorlm.data import build
from tailorlm.data.errors import DataError, UnknownTaskError
from tailorlm.data.schema import SPLITS, Task, User
from tailorlm.data.specs import TaskSpec

VARIANTS: dict[str, str] = {"leaked": "user_data_leaked.json", "no_leak": "user_data_no_leak.json"}


def find_file(spec: TaskSpec, data_dir: Path, variant: str | None) -> Path:
    """The data file for ``spec`` under ``data_dir``: the file itself, a task folder holding it, or a folder
    of task folders (``DIR/hatexplain/user_data_leaked.json``). Without a variant the leaked file is
    preferred, as PEFT-U's results use it."""
    if variant is not None and variant not in VARIANTS:
        raise UnknownTaskError(f"PEFT-U has no split {variant!r}; use one of {', '.join(VARIANTS)} (or none)")
    names = [VARIANTS[variant]] if variant else list(VARIANTS.values())
    if data_dir.is_file():
        return data_dir
    for folder in (data_dir, data_dir / spec.key):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"no {' or '.join(names)} here or in its {spec.key}/ subfolder", file=data_dir)


def _record(sid: str, sample: Any, path: Path, where: str) -> build.Record:
    if not isinstance(sample, Mapping):
        raise DataError(
            f"must be an object with text and label, got {type(sample).__name__}", file=path, record=where
        )
    if "text" not in sample:
        raise DataError("missing", file=path, record=where, field="text")
    if not isinstance(sample["text"], str):
        raise DataError(
            f"must be a string, got {type(sample['text']).__name__}", file=path, record=where, field="text"
        )
    if "label" not in sample:
        raise DataError("missing", file=path, record=where, field="label")
    labels = sample["label"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError("must be a non-empty list of strings", file=path, record=where, field="label")
    return build.Record(sid, sample["text"], tuple(labels), sid)


def _user_parts(uid: str, splits_raw: Any, path: Path) -> dict[str, list[build.Record]]:
    if not isinstance(splits_raw, Mapping):
        raise DataError("must be an object with train, val and test", file=path, record=f"user {uid}")
    parts: dict[str, list[build.Record]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        if split not in splits_raw:
            raise DataError("missing", file=path, record=f"user {uid}", field=split)
        samples = splits_raw[split]
        if not isinstance(samples, Mapping):
            raise DataError(
                "must be an object {sample_id: sample}", file=path, record=f"user {uid}", field=split
            )
        parts[split] = []
        for sid, sample in samples.items():
            where = f"user {uid} / {split} / {sid}"
            if sid in seen:
                raise DataError(f"the same sample is also in {seen[sid]}", file=path, record=where)
            seen[sid] = split
            parts[split].append(_record(str(sid), sample, path, where))
    if not seen:
        raise DataError("user has no samples", file=path, record=f"user {uid}")
    return parts


def _check_labels(spec: TaskSpec, uid: str, parts: dict[str, list[build.Record]], path: Path) -> None:
    """Single-label tasks must not carry label lists; tasks whose label strings PEFT-U's config fixes are
    held to them. (For the others the file's own strings win: their preparation scripts copy them from
    the raw data, so this package cannot know them for sure.)"""
    strict = spec.options.get("strict_labels", True)
    for split, records in parts.items():
        for record in records:
            where = f"user {uid} / {split} / {record.key}"
            if len(record.targets) > 1 and spec.kind != "multilabel":
                raise DataError(
                    f"{len(record.targets)} labels, but {spec.name} is single-label", path, where, "label"
                )
            if strict:
                build.check_labels(record.targets, spec.labels, path, where, "label")


def _task_labels(spec: TaskSpec, users: list[User], path: Path) -> tuple[str, ...]:
    found = {label for user in users for example in user.examples() for label in example.targets}
    known = spec.labels or ()
    if spec.kind == "rating" and not known:  # a task file of kind rating: the scale needs its order
        return build.rating_labels(found, path)
    return tuple(known) if found <= set(known) else tuple(sorted(found))


def load(spec: TaskSpec, data_dir: Path, variant: str | None = None) -> Task:
    path = find_file(spec, data_dir, variant)
    raw = build.read_json(path)
    if not isinstance(raw, Mapping):
        raise DataError("top level must be an object {user_id: {train, val, test}}", file=path)
    if not raw:
        raise DataError("no users", file=path)
    users: list[User] = []
    for uid in sorted(raw, key=build.natural_key):
        parts = _user_parts(str(uid), raw[uid], path)
        _check_labels(spec, str(uid), parts, path)
        users.append(build.subjective_user(spec, str(uid), (parts["train"], parts["val"], parts["test"])))
    labels = _task_labels(spec, users, path)
    source = f"{path}; {build.rating_note(labels)}" if spec.kind == "rating" else str(path)
    return build.task(spec, users, source, chronological=False, labels=labels)
