"""A user's history: the records the index keeps, the task examples they stand for, and the fingerprint
that says whether a module was trained on the history a user has now. Plain functions over records; who
may write a history, and when, is ``users.lifecycle``'s to decide."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from tailorlm.data.schema import Example, Task, User
from tailorlm.store.index import HistoryRecord
from tailorlm.users.errors import UserError

HISTORY_SPLITS = ("train", "val")  # what a user's module trains on and picks its best epoch by

UserSelection = Sequence[str] | int | None  # some users by id, the first N, or all of them


def fingerprint(records: Iterable[HistoryRecord]) -> str:
    """sha256 over history records in the order given (the store's order): every field counts, so any
    edit, addition or move between splits changes it. A record without an item key hashes as before item
    keys were kept, so a store's existing users stay up to date."""
    digest = hashlib.sha256()
    for record in records:
        fields = [record.item_id, record.input, record.target, record.split, record.time, dict(record.fields)]
        if record.item_key is not None:
            fields.append(record.item_key)
        digest.update(json.dumps(fields, sort_keys=True).encode("utf-8") + b"\n")
    return digest.hexdigest()


def to_example(record: HistoryRecord) -> Example:
    """A history record as the task example it was imported from (or would have been)."""
    return Example(
        id=record.item_id,
        text=record.input,
        target=record.target,
        targets=(record.target,),
        item_key=record.item_key,
        time=record.time,
        fields=dict(record.fields),
    )


def to_record(example: Example, split: str) -> HistoryRecord:
    return HistoryRecord(
        example.id, example.text, example.target, split, example.time, dict(example.fields), example.item_key
    )


def checked_items(items: Sequence[HistoryRecord]) -> list[HistoryRecord]:
    """``items`` if each is a well-formed history record (an id, text input and target, a known split,
    JSON fields, text the index can keep), else a ``UserError`` naming the first that is not."""
    checked = []
    for item in items:
        if not isinstance(item, HistoryRecord):
            raise UserError(f"a history item must be a HistoryRecord, got {type(item).__name__}")
        if not isinstance(item.item_id, str) or not item.item_id:
            raise UserError("every history item needs a non-empty string id")
        if not isinstance(item.input, str) or not isinstance(item.target, str):
            raise UserError(f"history item {item.item_id!r}: input and target must be text")
        if item.item_key is not None and (not isinstance(item.item_key, str) or not item.item_key):
            raise UserError(f"history item {item.item_id!r}: an item key must be non-empty text")
        if item.split not in HISTORY_SPLITS:
            raise UserError(
                f"history item {item.item_id!r}: split {item.split!r} is not one of {HISTORY_SPLITS}"
            )
        for name in ("item_id", "input", "target", "item_key"):
            _check_storable(item, name)
        try:
            json.dumps(dict(item.fields))
        except (TypeError, ValueError) as error:
            raise UserError(f"history item {item.item_id!r}: fields are not JSON ({error})") from None
        checked.append(item)
    return checked


def _check_storable(item: HistoryRecord, name: str) -> None:
    """The field ``name`` of ``item`` is text both index databases keep as it is: UTF-8 (a lone surrogate,
    which a JSON escape can carry, is not) without NUL (PostgreSQL's text type refuses it)."""
    text = getattr(item, name)
    if text is None:
        return
    if "\x00" in text:
        raise UserError(f"history item {item.item_id!r}: {name} holds a NUL character, which is not kept")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(
            f"history item {item.item_id!r}: {name} holds a lone surrogate (U+D800-U+DFFF), not UTF-8 text"
        ) from None


def user_of(user_id: str, records: Sequence[HistoryRecord]) -> User:
    """A data-model user with the train and validation examples of ``records`` (no history items)."""
    return User(
        id=user_id,
        train=[to_example(r) for r in records if r.split == "train"],
        val=[to_example(r) for r in records if r.split == "val"],
    )


def select(task: Task, users: UserSelection) -> list[User]:
    """The users of ``task`` an import asked for: some by id, the first N, or all."""
    if users is None:
        return list(task.users)
    if isinstance(users, str):  # one id, not a sequence of one-character ids
        users = [users]
    if isinstance(users, int):
        if users < 1:
            raise UserError(f"import at least one user, not {users}")
        return list(task.users[:users])
    wanted = list(dict.fromkeys(users))
    missing = [u for u in wanted if u not in {user.id for user in task.users}]
    if missing:
        raise UserError(f"task {task.name} has no user(s) {', '.join(map(repr, missing[:5]))}")
    return [task.user(u) for u in wanted]
