"""Turning one user's labelled records into a ``User``, under the two split policies.

Loaders parse their format into ``Record`` lists and call ``subjective_user`` or ``timeline_user``; the
rules about what becomes history and what each example may see live here, once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailorlm import metrics
from tailorlm.data import render, splits
from tailorlm.data.errors import DataError
from tailorlm.data.schema import Example, HistoryItem, Task, User
from tailorlm.data.specs import TaskSpec


@dataclass(frozen=True, slots=True)
class Record:
    """One labelled item of one user before splitting; ``key`` is unique within the user."""

    key: str
    text: str
    targets: tuple[str, ...]
    item_key: str | None = None
    time: float | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return ", ".join(self.targets)


def natural_key(value: str) -> tuple:
    """Sort "2" before "10" and keep every other id in plain string order, so user and item order never
    depends on how a file happened to be written."""
    parts = re.split(r"(\d+)", value)
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in parts)


def example_id(user_id: str, key: str) -> str:
    return f"{user_id}/{key}"


def to_example(user_id: str, record: Record, visible_before: int | None = None) -> Example:
    return Example(
        id=example_id(user_id, record.key),
        text=record.text,
        target=record.target,
        targets=record.targets,
        item_key=record.item_key,
        time=record.time,
        fields=record.fields,
        visible_before=visible_before,
    )


def to_history(spec: TaskSpec, example: Example) -> HistoryItem:
    """A train example as the user's history item; it keeps the example's id, so asking that example
    never retrieves it."""
    values = {**example.fields, "text": example.text, "target": example.target}
    return HistoryItem(id=example.id, text=render.document(spec, values), fields=values, time=example.time)


def subjective_user(
    spec: TaskSpec,
    user_id: str,
    parts: tuple[Sequence[Record], Sequence[Record], Sequence[Record]],
    user_fields: Mapping[str, Any] | None = None,
) -> User:
    """A user whose items have no time: history is the train split (in key order); every example may see
    all of it except itself."""
    train, val, test = (sorted(part, key=lambda r: natural_key(r.key)) for part in parts)
    train_examples = [to_example(user_id, r) for r in train]
    return User(
        id=user_id,
        train=train_examples,
        val=[to_example(user_id, r) for r in val],
        test=[to_example(user_id, r) for r in test],
        history=[to_history(spec, e) for e in train_examples],
        fields=dict(user_fields or {}),
    )


def stratified_user(
    spec: TaskSpec, user_id: str, records: Sequence[Record], seed: int, user_fields: Mapping[str, Any] | None
) -> User | None:
    """PEFT-U's policy: 80/10/10 stratified by label; ``None`` for a user with too few items."""
    if len(records) < splits.MIN_ITEMS:
        return None
    parts = splits.stratified_split(records, lambda r: r.target, lambda r: r.key, user_id, seed)
    return subjective_user(spec, user_id, parts, user_fields)


def timeline_user(
    spec: TaskSpec, user_id: str, records: Sequence[Record], user_fields: Mapping[str, Any] | None = None
) -> User | None:
    """The chronological policy: the latest items are test, the ones before validation, the rest train and
    history. A train example sees only the train items before it; validation and test see all of train."""
    if len(records) < splits.MIN_ITEMS:
        return None
    train, val, test = splits.chronological_split(records, lambda r: (r.time, natural_key(r.key)))
    train_examples = [to_example(user_id, r, visible_before=i) for i, r in enumerate(train)]
    return User(
        id=user_id,
        train=train_examples,
        val=[to_example(user_id, r, visible_before=len(train)) for r in val],
        test=[to_example(user_id, r, visible_before=len(train)) for r in test],
        history=[to_history(spec, e) for e in train_examples],
        fields=dict(user_fields or {}),
    )


def hold_out_items(loaded: Task, seed: int) -> Task:
    """``loaded`` split by item instead of per user (``splits.held_out_items``): every user's answers to the
    test items are their test, to the validation items their validation, the rest their train and
    history. Users left without a training or a test answer are dropped. Needs items shared across users
    and no timeline (a held-out item's answers may be older than training ones)."""
    if loaded.chronological:
        raise DataError(
            f"task {loaded.name} is a timeline (each user's test items are their latest), so items cannot be "
            "held out across users"
        )
    keys = [e.item_key for u in loaded.users for e in u.examples()]
    if not keys or any(key is None for key in keys):
        raise DataError(
            f"task {loaded.name} has examples without an item id, so items cannot be held out",
            file=loaded.source,
        )
    try:
        test_items, val_items = splits.held_out_items(keys, seed)
    except ValueError as error:
        raise DataError(str(error), file=loaded.source) from None
    users = []
    for user in loaded.users:
        pooled = sorted(user.examples(), key=lambda e: natural_key(e.item_key))
        test = [e for e in pooled if e.item_key in test_items]
        val = [e for e in pooled if e.item_key in val_items]
        train = [e for e in pooled if e.item_key not in test_items and e.item_key not in val_items]
        if train and test:
            history = [to_history(loaded.spec, e) for e in train]
            users.append(User(user.id, train, val, test, history, dict(user.fields)))
    source = (
        f"{loaded.source} (items held out for every user: {len(test_items)} test, {len(val_items)} "
        f"validation of {len(set(keys))}, seed {seed})"
    )
    return task(loaded.spec, users, source, chronological=False, labels=loaded.labels)


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning a missing file or a syntax error into a DataError that names it."""
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})", file=path
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err.reason})", file=path) from None


def check_labels(
    values: Iterable[str], labels: Sequence[str] | None, file: Path | str, record: str, field_name: str
) -> None:
    if labels is None:
        return
    for value in values:
        if value not in labels:
            raise DataError(
                f"label {value!r} is not one of the task's labels ({', '.join(labels)})",
                file=file,
                record=record,
                field=field_name,
            )


def task(
    spec: TaskSpec, users: list[User], source: str, chronological: bool, labels: tuple[str, ...] | None = None
) -> Task:
    """The loaded task; ``labels`` overrides the spec's when the file decides them."""
    return Task(
        name=spec.name,
        kind=spec.kind,
        labels=spec.labels if labels is None else labels,
        metrics=spec.metrics,
        users=users,
        spec=spec,
        source=source,
        chronological=chronological,
    )


def rating_labels(found: Iterable[str], file: Path | str) -> tuple[str, ...]:
    """The scale of a rating task whose task file lists no labels, from the labels ``found`` in ``file``:
    numbers, in numeric order. Words have no order to read, so they are an error naming the fix."""
    found = sorted(set(found))
    if metrics.rating_values(found) is None:
        return tuple(sorted(found, key=float))
    example = ", ".join(json.dumps(label) for label in found[:5]) + (", ..." if len(found) > 5 else "")
    raise DataError(
        f"a rating task's labels are scored by their order, and these are not all numbers ({example}): "
        'list them in the task file in their order, as "labels": [...]',
        file=file,
        field="labels",
    )


def rating_note(labels: Sequence[str]) -> str:
    """How a rating scale is read, for the task's source line (data show, run.json, the report)."""
    if metrics.rating_values(labels) is None:
        return "ratings scored as the numbers they are"
    return f"rating labels scored as their position 1-{len(labels)} in the task file's order"
