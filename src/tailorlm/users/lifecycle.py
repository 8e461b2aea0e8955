"""A user's lifecycle, in one place: created (``add``, ``import_task``), written to (history, spec, keys),
shown, rolled back and forgotten (``delete``).

Whether a user exists is decided by the index inside the transaction of each write
(``store.index.StoreIndex``: a write for a user who is not there, or was forgotten, is refused), never by
a check here followed by a write there: ``_existing`` turns that refusal into the one-line ``UserError``.
Forgetting writes a tombstone that refuses every later write for the id until an explicit re-create
(``add``); an import never re-creates a forgotten user. See docs/forgetting.md."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tailorlm import kinds
from tailorlm.data import DataError, UnknownTaskError, load_task
from tailorlm.data import build as data_build
from tailorlm.data import specs as task_specs
from tailorlm.data.schema import Task, User
from tailorlm.kinds import ModuleSpec, ModuleSpecError
from tailorlm.methods.profiles import UserProfile
from tailorlm.store.index import HistoryRecord, UnknownUserError, VersionRecord
from tailorlm.store.module_folder import ModuleFileError
from tailorlm.users import keys
from tailorlm.users.errors import UserError
from tailorlm.users.history import UserSelection, checked_items, fingerprint, select, to_record, user_of
from tailorlm.users.identity import cache_of, check_user_id, legacy_cache_of
from tailorlm.users.settings import StoreSettings, resolve_spec

PROFILE_FILE = "profile.json"  # a user's PAG profile, in their cache folder


@dataclass(frozen=True)
class UserInfo:
    """One user as ``list`` and ``show`` report them; never their keys, only how many they have."""

    user_id: str
    kind: str
    spec: dict[str, Any]
    current_version: int | None
    versions: list[VersionRecord]
    history: int
    data_fingerprint: str
    data_changed: bool  # a module exists and was trained on other history than the user has now
    needs_training: str | None  # why ``train`` would train them now; None: up to date
    keys: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImportResult:
    task: str
    users: list[str]
    new_users: int
    items_added: int
    forgotten: list[str] = field(default_factory=list)  # left out: forgotten, so created again only by add


@dataclass(frozen=True)
class Forgotten:
    """What ``delete`` removed of one user."""

    user_id: str
    versions: list[int]
    history: int
    keys: int
    cache: bool  # whether a cache folder of theirs existed
    # Whether the deleted rows are compacted away in the index yet (SQLite: vacuumed, and the write-ahead
    # log folded in and truncated; PostgreSQL: vacuumed); if not, why not: it is retried in the background.
    compacted: bool = True
    compaction: str | None = None


class Lifecycle(StoreSettings):
    """Users of the store: who exists, their history, keys and versions, and forgetting them."""

    def _require_user(self, user_id: str) -> str:
        if not self._existing_index().has_user(user_id):
            raise self._no_user(user_id)
        return user_id

    def _no_user(self, user_id: str) -> UserError:
        """The error for a user the store does not hold: saying, for a forgotten one, when and whether
        their deleted data is compacted away yet."""
        stone = self.index.tombstone(user_id) if self.exists() else None
        if stone is None:
            return UserError(f"no user {user_id!r} in {self.location}")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stone.deleted))
        state = (
            "their deleted data is compacted away"
            if stone.compacted is not None
            else "their deleted data is not compacted away yet (a reader holds the index; retried)"
        )
        return UserError(f"no user {user_id!r} in {self.location}: forgotten at {when}; {state}")

    @contextlib.contextmanager
    def _existing(self, user_id: str) -> Iterator[None]:
        """Around a write whose transaction decides that ``user_id`` exists: their absence (never added,
        or forgotten, maybe by a delete a moment ago) is the one-line ``UserError``."""
        try:
            yield
        except UnknownUserError:
            raise self._no_user(user_id) from None

    def spec_of(self, user_id: str) -> ModuleSpec:
        """The spec ``user_id``'s module trains with: their own, else the store's default."""
        own = self.index.user_spec(user_id)
        settings = self.settings()
        try:
            spec = kinds.spec_from_dict(own if own is not None else settings.spec)
        except ModuleSpecError as error:
            raise UserError(f"user {user_id!r}: unreadable module spec ({error})") from error
        try:
            return kinds.for_labels(spec, settings.labels)
        except ModuleSpecError as error:
            raise UserError(f"user {user_id!r}: {error}") from error

    def add(
        self, user_id: str, kind: str | ModuleSpec | None = None, history: Sequence[HistoryRecord] = ()
    ) -> UserInfo:
        """A new user, with their own module kind (else the store's default) and any history."""
        check_user_id(user_id)
        spec = resolve_spec(kind, self.settings().labels, self.collab_spec()) if kind is not None else None
        items = checked_items(history)
        # The explicit re-create of a forgotten user: their tombstone goes, in the same transaction.
        if not self.index.add_user(user_id, revive=True):
            raise UserError(f"user {user_id!r} already exists in {self.location}")
        with self._existing(user_id):  # a delete may come between these writes: each checks
            if spec is not None:
                self.index.set_user_spec(user_id, kinds.spec_to_dict(spec))
            if items:
                self.index.add_unseen_history(user_id, items, create=False)
        return self.show(user_id)

    def add_history(self, user_id: str, items: Sequence[HistoryRecord]) -> int:
        """Append new behaviour to ``user_id``'s history; items whose id the history already holds are
        left out (a retried request adds nothing). Returns how many were added. The user's module is
        now out of date (``needs_training``) until retrained."""
        items = checked_items(items)
        with self._existing(self._require_user(user_id)):  # checked again in the write's transaction
            return self.index.add_unseen_history(user_id, items, create=False)

    def import_task(
        self,
        task_name: str,
        data_dir: str | Path | None = None,
        split: str | None = None,
        users: UserSelection = None,
        kind: str | ModuleSpec | None = None,
        seed: int = 0,
    ) -> ImportResult:
        """Load a task (offline tasks need no ``data_dir``; PEFT-U and LaMP read your files) and write each
        chosen user's train and validation examples into their history. Test examples stay out: they are
        the task's held-out answers. Importing the same items again adds nothing."""
        if isinstance(kind, str) and kind not in kinds.KINDS:  # before the task loads, which takes long
            resolve_spec(kind)
        try:
            loaded = load_task(task_name, data_dir=data_dir, split=split, seed=seed)
        except (DataError, UnknownTaskError) as error:
            raise UserError(str(error)) from error
        self._check_task(self.settings(), loaded.name, seed)
        spec = resolve_spec(kind, loaded.labels, self.collab_spec()) if kind is not None else None
        chosen = select(loaded, users)
        for user in chosen:
            check_user_id(user.id)
        # Every record is checked before the first is written: text the index cannot keep, in any user,
        # imports nothing rather than half the users.
        records_of = {
            user.id: checked_items(
                [to_record(e, "train") for e in loaded.training_examples(user)]
                + [to_record(e, "val") for e in user.val]
            )
            for user in chosen
        }
        # Settings first: a store interrupted mid-import already knows its task, and re-importing fills in.
        self._save_settings(
            replace(
                self.settings(),
                task=loaded.name,
                data_dir=None if data_dir is None else str(Path(data_dir).expanduser().resolve()),
                split=split,
                seed=seed,
                labels=loaded.labels,
                task_spec=None if _bundled(loaded.name) else loaded.spec.to_dict(),
            )
        )
        new_users = added = 0
        imported: list[str] = []
        forgotten: list[str] = []
        for user in chosen:
            try:  # an import never brings a forgotten user back: ``add`` does, when asked to
                new_users += self.index.add_user(user.id, revive=False)
                if spec is not None:
                    self.index.set_user_spec(user.id, kinds.spec_to_dict(spec))
                added += self.index.add_unseen_history(user.id, records_of[user.id], create=False)
                imported.append(user.id)
            except UnknownUserError:
                forgotten.append(user.id)
        return ImportResult(loaded.name, imported, new_users, added, forgotten)

    def history(self, user_id: str) -> list[HistoryRecord]:
        self._require_user(user_id)
        return self.index.history(user_id)

    def data_user(self, user_id: str, task: Task | None = None) -> User:
        """``user_id`` as the task's data model: their train and validation examples, and (for retrieval
        and profiles) their train examples as history items, rendered with the task's document template.
        ``task``: the store's task when the caller has it already (a server keeps it), else read."""
        task = task or self.task()
        user = user_of(user_id, self.history(user_id))
        user.history = [data_build.to_history(task.spec, e) for e in user.train]
        return user

    def data_fingerprint(self, user_id: str) -> str:
        return fingerprint(self.history(user_id))

    def needs_training(self, user_id: str) -> str | None:
        """Why ``train`` would train ``user_id`` now, or None when their module is up to date."""
        return self._stale(user_id, self.data_fingerprint(user_id), self.spec_of(user_id))

    def _stale(self, user_id: str, data: str, spec: ModuleSpec) -> str | None:
        current = self.store.current(user_id)
        if current is None:
            return "no module yet"
        if current.data_fingerprint != data:
            return "history changed since their module was trained"
        if current.spec != kinds.spec_to_dict(spec):
            return "module spec changed"
        if kinds.of(spec).made_by == "fold-in" and current.metrics.get("folded_against") != (
            self.collab_items_fingerprint()
        ):
            # A swap of the part racing a ``train`` that read the old one (the swap itself is refused once
            # collab users have vectors): the vector is refolded against the items the store has now.
            return "folded in against other item factors than the store's collab part has"
        return None

    def show(self, user_id: str) -> UserInfo:
        self._require_user(user_id)
        records = self.index.history(user_id)
        data = fingerprint(records)
        spec = self.spec_of(user_id)
        current = self.store.current(user_id)
        return UserInfo(
            user_id=user_id,
            kind=spec.kind,
            spec=kinds.spec_to_dict(spec),
            current_version=current.version if current else None,
            versions=self.store.versions(user_id),
            history=len(records),
            data_fingerprint=data,
            data_changed=current is not None and current.data_fingerprint != data,
            needs_training=self._stale(user_id, data, spec),
            keys=len(self.index.keys_of(user_id)),
        )

    def list_users(self) -> list[UserInfo]:
        return [self.show(user_id) for user_id in self._existing_index().user_ids()]

    def profile(self, user_id: str) -> UserProfile | None:
        """The profile the user's last training wrote, or None. A store written before hashed folder
        names may hold it in a legacy cache folder, which another user may share: read only if it names
        this user."""
        for folder in (cache_of(user_id), legacy_cache_of(user_id)):
            text = self.store.files.read_text(f"{folder}/{PROFILE_FILE}")
            values = json.loads(text) if text is not None else None
            if values is not None and values.get("user") == user_id:
                return UserProfile(values["user"], values["text"], tuple(values["items"]))
        return None

    def _legacy_cache_is_theirs(self, user_id: str) -> bool:
        text = self.store.files.read_text(f"{legacy_cache_of(user_id)}/{PROFILE_FILE}")
        return text is not None and json.loads(text).get("user") == user_id

    def rollback(self, user_id: str, version: int | None = None) -> VersionRecord:
        """Serve ``version`` of ``user_id`` again (default: the one before the current)."""
        self._require_user(user_id)
        try:
            return self.store.rollback(user_id, version)
        except (ModuleFileError, KeyError) as error:
            raise UserError(error.args[0] if error.args else str(error)) from None

    def cache_folder(self, user_id: str) -> Path:
        """Where per-user data derived from the history (profiles, retrieval indexes) belongs, so that
        ``delete`` removes it with the user."""
        return self.store.files.local(cache_of(user_id))

    def delete(self, user_id: str) -> Forgotten:
        """Forget ``user_id``: every module version (folders removed, index rows overwritten and the
        write-ahead log truncated), their history, their keys, their spec and their cache folder."""
        self._require_user(user_id)
        legacy_cache = self._legacy_cache_is_theirs(user_id)
        forgotten = Forgotten(
            user_id,
            versions=[v.version for v in self.store.versions(user_id)],
            history=len(self.index.history(user_id)),
            keys=len(self.index.keys_of(user_id)),
            cache=self.store.files.exists(cache_of(user_id)) or legacy_cache,
        )
        blocked = self.store.delete(user_id)  # the users row cascades to versions, history and keys
        self.store.files.remove(cache_of(user_id))
        if legacy_cache:
            self.store.files.remove(legacy_cache_of(user_id))
        return replace(forgotten, compacted=blocked is None, compaction=blocked)

    def await_compaction(self, forgotten: Forgotten, seconds: float) -> Forgotten:
        """Retry the compaction a reader held up after ``delete``, for up to ``seconds``; ``forgotten``
        with what became of it."""
        deadline = time.monotonic() + seconds
        blocked = forgotten.compaction
        pause = 0.25
        while blocked is not None and time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            blocked = self.index.compact()
            pause = min(2.0, pause * 2)
        return replace(forgotten, compacted=blocked is None, compaction=blocked)

    def issue_key(self, user_id: str | None, admin: bool = False, label: str | None = None) -> str:
        """A new key for ``user_id`` (or an admin key), returned this once and stored only as a hash."""
        if admin:
            return keys.issue_key(self.index, None, "admin", label)
        with self._existing(user_id):
            return keys.issue_key(self._existing_index(), user_id, "user", label)

    def revoke_keys(self, user_id: str) -> int:
        self._require_user(user_id)
        return keys.revoke_user_keys(self.index, user_id)

    def revoke_admin_keys(self) -> int:
        return keys.revoke_admin_keys(self._existing_index())

    def revoke_key(self, key: str) -> bool:
        return keys.revoke_key(self._existing_index(), key)

    def resolve_key(self, presented: object) -> keys.KeyOwner | None:
        """Whom a presented key belongs to; None for anything else (and for a store that does not exist)."""
        return keys.resolve_key(self.index, presented) if self.exists() else None


def _bundled(task: str) -> bool:
    """Whether ``task`` is a bundled task, found again by its name (else the store keeps its spec)."""
    try:
        task_specs.spec(task)
    except UnknownTaskError:
        return False
    return True
