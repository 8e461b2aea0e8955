"""The users of one module store and everything done to them: adding and importing users with their
history, listing them, training their modules many users per step, rolling back, forgetting, API keys.

The command line (``tailorlm users ...``) and the server both call ``UserService``; neither holds user
logic of its own. Everything the service knows lives in the store (``ModuleStore`` and its index):
the store-wide settings (which task the users came from, so a later ``train`` or a server renders a
user's history into the same prompts; the base model; the default module spec) in the index's ``meta``
table, each user's own module spec in their ``users`` row. So a worker process given only the store's
root can train (``train_users``).

A user needs training when they have no module, when their history changed since their current module
was trained (the module's version records the fingerprint of the data it saw), or when their module
spec changed. Each trained user is stored the moment they finish, with that fingerprint, so a killed
``train`` started again trains only the users it had not finished.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tailorlm import kinds
from tailorlm.data import DataError, UnknownTaskError, load_task
from tailorlm.data import build as data_build
from tailorlm.data import specs as task_specs
from tailorlm.data.schema import Example, Task, User
from tailorlm.engine.engine import Engine
from tailorlm.files import atomic_folder
from tailorlm.kinds import ModuleSpec, ModuleSpecError
from tailorlm.kinds.lora import LoraSpec
from tailorlm.methods import label_models
from tailorlm.methods.deps import BaseLoader, MethodDeps, MethodSettings, base_loader
from tailorlm.methods.profiles import ProfileWriter, UserProfile
from tailorlm.methods.recipes import Recipe
from tailorlm.methods.setups import PERSONAL_KINDS, personal_job
from tailorlm.models import BaseModel
from tailorlm.progress import ProgressCallback
from tailorlm.store import module_folder
from tailorlm.store.index import HistoryRecord, StoreIndex, UnknownUserError, VersionRecord
from tailorlm.store.module_folder import ModuleFileError
from tailorlm.store.roots import LocalRoot
from tailorlm.store.store import ModuleStore
from tailorlm.train.jobs import LocalRunner, TrainRunner, TrainWork
from tailorlm.train.trainer import TrainConfig
from tailorlm.users import keys
from tailorlm.users.errors import UserError
from tailorlm.users.identity import MAX_USER_ID, cache_of, check_user_id, legacy_cache_of

__all__ = ["MAX_USER_ID", "UserService", "check_user_id", "train_users"]

SETTINGS_KEY = "users.settings"  # the index meta row holding ServiceSettings as JSON
HISTORY_SPLITS = ("train", "val")  # what a user's module trains on and picks its best epoch by
DEFAULT_KIND = "lora"
TASK_ADAPTER_FOLDER = ".task-adapter"  # hidden for the same reason
PROFILE_FILE = "profile.json"  # a user's PAG profile, in their cache folder

UserSelection = Sequence[str] | int | None  # some users by id, the first N, or all of them


@dataclass(frozen=True)
class ServiceSettings:
    """What a store's users share: the task their history came from (rendered into prompts with that
    task's templates), the base model their modules are for, and the spec a user without their own has."""

    task: str | None = None
    data_dir: str | None = None
    split: str | None = None
    seed: int = 0
    labels: tuple[str, ...] | None = None  # PEFT-U and LaMP files may decide a task's labels
    base_model: str | None = None  # a name models.load_base accepts; None: the project's default model
    # OPPU: a non-personal task adapter merged into the base before users train and are served, kept in
    # the store (TASK_ADAPTER_FOLDER) so a worker process or a server finds it; None: the plain base.
    task_adapter: str | None = None
    label_fit: str = "bias"  # how label-bias users are fitted: one of ``label_models.FITS``
    spec: dict[str, Any] = field(default_factory=lambda: default_spec_dict(DEFAULT_KIND))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServiceSettings:
        # Settings a newer version wrote and this one does not know are left out, not an error.
        values = {k: v for k, v in json.loads(text).items() if k in cls.__dataclass_fields__}
        if values.get("labels") is not None:
            values["labels"] = tuple(values["labels"])
        return cls(**values)


def check_label_fit(fit: str) -> str:
    """``fit`` if label-bias users can be fitted that way (``label_models.FITS``)."""
    if fit not in label_models.FITS:
        raise UserError(f"label fit {fit!r} is not one of {', '.join(label_models.FITS)}")
    return fit


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
class TrainOutcome:
    trained: list[str]  # in the order they finished (and were stored)
    skipped: dict[str, str]  # user id -> why they were not trained


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


def default_spec_dict(kind: str) -> dict[str, Any]:
    """The spec the benchmark's per-user method of ``kind`` uses (``methods.setups.PERSONAL_KINDS``)."""
    return kinds.spec_to_dict(PERSONAL_KINDS[kind].spec)


def resolve_spec(kind: str | ModuleSpec, labels: Sequence[str] | None = None) -> ModuleSpec:
    """A module spec from a kind's name (its default settings) or a spec, checked by its kind; a kind over
    a task's labels (a label bias) gets ``labels``, the store task's."""
    try:
        spec = kinds.validate(kinds.default_spec(kind) if isinstance(kind, str) else kind)
        return kinds.for_labels(spec, labels)
    except ModuleSpecError as error:
        raise UserError(str(error)) from error


def fingerprint(records: Iterable[HistoryRecord]) -> str:
    """sha256 over history records in the order given (the store's order): every field counts, so any
    edit, addition or move between splits changes it."""
    digest = hashlib.sha256()
    for record in records:
        fields = [record.item_id, record.input, record.target, record.split, record.time, dict(record.fields)]
        digest.update(json.dumps(fields, sort_keys=True).encode("utf-8") + b"\n")
    return digest.hexdigest()


def to_example(record: HistoryRecord) -> Example:
    """A history record as the task example it was imported from (or would have been)."""
    return Example(
        id=record.item_id,
        text=record.input,
        target=record.target,
        targets=(record.target,),
        time=record.time,
        fields=dict(record.fields),
    )


def to_record(example: Example, split: str) -> HistoryRecord:
    return HistoryRecord(example.id, example.text, example.target, split, example.time, dict(example.fields))


class UserService:
    """The users of the store at ``store`` (a ``ModuleStore``, or its root: a folder or an fsspec URL;
    ``index`` as ``ModuleStore`` takes it, None finding the index the root records). ``load_base`` builds
    a fresh base model per call (tests hand in the tiny one); by default the store's base model is loaded
    on ``device`` in ``dtype``. ``method_settings`` gives the training defaults (epochs, batch size, users
    per step, prompt length) the benchmark's per-user methods use. ``runner`` decides where training
    groups run (default: this process; ``cluster.training.RayRunner``: Ray workers)."""

    def __init__(
        self,
        store: ModuleStore | str | Path,
        load_base: BaseLoader | None = None,
        method_settings: MethodSettings | None = None,
        device: str | None = None,
        dtype: str | None = None,
        index: str | None = None,
        runner: TrainRunner | None = None,
    ) -> None:
        self.store = store if isinstance(store, ModuleStore) else ModuleStore(store, index=index)
        self.method_settings = method_settings or MethodSettings()
        self.runner = runner or LocalRunner()
        self._load_base = load_base
        self._placement = (device, dtype)

    # ---- the store and its settings ------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The store's folder on this machine (a store under a URL has none: ``location``)."""
        return self.store.root

    @property
    def location(self) -> str:
        """The store's root as given, a folder or a URL: how messages name it."""
        return self.store.location

    @property
    def index(self) -> StoreIndex:
        """The index, created on first use: only commands that add users call this on a new root."""
        return self.store.index

    def exists(self) -> bool:
        return self.store.exists()

    def _existing_index(self) -> StoreIndex:
        """The index of a store that exists; reading a store that is not there is a mistake, not an
        empty answer (a mistyped ``--store`` would otherwise look like a store with no users)."""
        if not self.exists():
            raise UserError(f"no user store at {self.location}: add or import users first")
        return self.index

    def settings(self) -> ServiceSettings:
        text = self.index.meta(SETTINGS_KEY) if self.exists() else None
        return ServiceSettings.from_json(text) if text else ServiceSettings()

    def _save_settings(self, settings: ServiceSettings) -> ServiceSettings:
        self.index.set_meta(SETTINGS_KEY, settings.to_json())
        return settings

    def configure(
        self,
        *,
        task: str | None = None,
        base_model: str | None = None,
        kind: str | ModuleSpec | None = None,
        task_adapter: str | Path | None = None,
        label_fit: str | None = None,
    ) -> ServiceSettings:
        """Set store-wide settings; None leaves one as it is. The task and the base model are fixed once
        users depend on them: a store holds one task's users and modules for one base model."""
        settings = self.settings()
        if task is not None:
            self._check_task(settings, task, settings.seed)
            if task != settings.task:
                spec = self._task_spec(task)
                settings = replace(settings, task=spec.name, labels=spec.labels)
        if base_model is not None and base_model != settings.base_model:
            if self.store.users():
                raise UserError(
                    f"the modules in {self.location} are for base model "
                    f"{settings.base_model or 'the default'}; use another store for another base model"
                )
            settings = replace(settings, base_model=base_model)
        if kind is not None:
            settings = replace(settings, spec=kinds.spec_to_dict(resolve_spec(kind, settings.labels)))
        if task_adapter is not None:
            settings = replace(settings, task_adapter=self._keep_task_adapter(Path(task_adapter)))
        if label_fit is not None:
            settings = replace(settings, label_fit=check_label_fit(label_fit))
        return self._save_settings(settings)

    def _keep_task_adapter(self, folder: Path) -> str:
        """Copy a task adapter's module folder into the store (users' modules depend on it, so it must not
        change or vanish under them); returns its folder relative to the root."""
        if self.store.users():
            raise UserError(
                f"the modules in {self.location} were trained without this task adapter; "
                "use a new store for it"
            )
        try:
            stored = module_folder.read_module(folder)
        except ModuleFileError as error:
            raise UserError(f"task adapter: {error}") from None
        if not kinds.of(stored.spec).mergeable:
            raise UserError(
                f"a {stored.spec.kind} task adapter cannot be merged into the base; use LoRA or IA3"
            )
        with self.store.files.new_folder(TASK_ADAPTER_FOLDER) as target, atomic_folder(target) as staging:
            for item in folder.iterdir():
                if item.is_file():
                    shutil.copy2(item, staging / item.name)
        return TASK_ADAPTER_FOLDER

    def with_task_adapter(self, base: BaseModel) -> BaseModel:
        """``base`` with the store's task adapter merged into its weights (OPPU), or as it is."""
        relative = self.settings().task_adapter
        if relative is not None:
            with self.store.files.reading(relative) as folder:
                stored = module_folder.read_module(folder)
            kinds.of(stored.spec).merge_into_base(stored.spec, base.model, stored.tensors)
        return base

    def _check_task(self, settings: ServiceSettings, task: str, seed: int) -> None:
        if settings.task is not None and (settings.task, settings.seed) != (task, seed):
            raise UserError(
                f"{self.location} holds users of task {settings.task} (seed {settings.seed}); "
                f"use another store for {task} (seed {seed})"
            )

    @staticmethod
    def _task_spec(task: str) -> task_specs.TaskSpec:
        try:
            return task_specs.spec(task)
        except UnknownTaskError as error:
            raise UserError(str(error)) from error

    def load_base(self) -> BaseLoader:
        """How this service gets a fresh base model: the injected loader, or the store's base model; with
        the store's task adapter merged in either way."""
        load = self._load_base or base_loader(self.settings().base_model, *self._placement)
        return lambda: self.with_task_adapter(load())

    def task(self, users: Sequence[User] = ()) -> Task:
        """The store's task, with ``users`` (none by default): what renders a user's examples into
        prompts."""
        settings = self.settings()
        if settings.task is None:
            raise UserError(
                f"{self.location} has no task, so a user's history cannot be turned into prompts: "
                "import users from a task first (tailorlm users import TASK)"
            )
        spec = self._task_spec(settings.task)
        return data_build.task(
            spec, list(users), source=self.location, chronological=False, labels=settings.labels
        )

    # ---- users ---------------------------------------------------------------------------------------

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
        spec = resolve_spec(kind, self.settings().labels) if kind is not None else None
        items = self._checked_items(history)
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
        items = self._checked_items(items)
        with self._existing(self._require_user(user_id)):  # checked again in the write's transaction
            return self.index.add_unseen_history(user_id, items, create=False)

    @staticmethod
    def _checked_items(items: Sequence[HistoryRecord]) -> list[HistoryRecord]:
        checked = []
        for item in items:
            if not isinstance(item, HistoryRecord):
                raise UserError(f"a history item must be a HistoryRecord, got {type(item).__name__}")
            if not isinstance(item.item_id, str) or not item.item_id:
                raise UserError("every history item needs a non-empty string id")
            if not isinstance(item.input, str) or not isinstance(item.target, str):
                raise UserError(f"history item {item.item_id!r}: input and target must be text")
            if item.split not in HISTORY_SPLITS:
                raise UserError(
                    f"history item {item.item_id!r}: split {item.split!r} is not one of {HISTORY_SPLITS}"
                )
            try:
                json.dumps(dict(item.fields))
            except (TypeError, ValueError) as error:
                raise UserError(f"history item {item.item_id!r}: fields are not JSON ({error})") from None
            checked.append(item)
        return checked

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
        spec = resolve_spec(kind, loaded.labels) if kind is not None else None
        chosen = _select(loaded, users)
        for user in chosen:
            check_user_id(user.id)
        # Settings first: a store interrupted mid-import already knows its task, and re-importing fills in.
        self._save_settings(
            replace(
                self.settings(),
                task=loaded.name,
                data_dir=None if data_dir is None else str(Path(data_dir).expanduser().resolve()),
                split=split,
                seed=seed,
                labels=loaded.labels,
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
                records = [to_record(e, "train") for e in loaded.training_examples(user)]
                records += [to_record(e, "val") for e in user.val]
                added += self.index.add_unseen_history(user.id, records, create=False)
                imported.append(user.id)
            except UnknownUserError:
                forgotten.append(user.id)
        return ImportResult(loaded.name, imported, new_users, added, forgotten)

    def history(self, user_id: str) -> list[HistoryRecord]:
        self._require_user(user_id)
        return self.index.history(user_id)

    def data_user(self, user_id: str) -> User:
        """``user_id`` as the task's data model: their train and validation examples, and (for retrieval
        and profiles) their train examples as history items, rendered with the task's document template."""
        task = self.task()
        user = _user_of(user_id, self.history(user_id))
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

    # ---- training ------------------------------------------------------------------------------------

    def train(
        self,
        user_ids: Sequence[str] | None = None,
        *,
        changed_only: bool = True,
        config: TrainConfig | None = None,
        on_progress: ProgressCallback | None = None,
        on_user: Callable[[VersionRecord], None] | None = None,
        start_from_current: bool = False,
    ) -> TrainOutcome:
        """Train ``user_ids`` (default: every user), skipping those whose module is up to date unless
        ``changed_only`` is False. Users sharing a module spec train together, many per step, on one
        engine; each is stored the moment they finish (``on_user`` gets the new version), so a killed
        run resumes where it stopped. ``start_from_current`` continues from each user's current module
        (a retrain after new history) instead of a fresh one. ``config`` None: each kind's learning rate
        with ``method_settings``' epochs, batch size and users per step."""
        explicit = user_ids is not None
        chosen = self._chosen(user_ids)
        task = self.task()
        skipped: dict[str, str] = {}
        groups: dict[str, tuple[ModuleSpec, list[tuple[User, str]]]] = {}
        for user_id in chosen:
            records = self.index.history(user_id)
            if not records and not self.index.has_user(user_id):
                skipped[user_id] = "forgotten"  # since the list of users was read
                continue
            user = _user_of(user_id, records)
            spec = self.spec_of(user_id)
            data = fingerprint(records)
            if changed_only and self._stale(user_id, data, spec) is None:
                skipped[user_id] = "up to date"
            elif not task.training_examples(user):
                if explicit:
                    raise UserError(f"user {user_id!r} has no training items in their history")
                skipped[user_id] = "no training items"
            else:
                key = json.dumps(kinds.spec_to_dict(spec), sort_keys=True)
                groups.setdefault(key, (spec, []))[1].append((user, data))
        plans = [(spec, members, config or self._default_config(spec)) for spec, members in groups.values()]
        progress = _Progress(on_progress, [sum(_steps(task, u, c) for u, _ in m) for _, m, c in plans])
        trained: list[str] = []
        for spec, members, group_config in plans:
            trained += self._train_group(
                task, spec, members, group_config, progress, on_user, start_from_current
            )
            gc.collect()  # the group's engine held a whole base model: free it before the next loads one
        self.write_profiles(trained)  # a new module means new behaviour: the profile follows it
        progress.finish()
        return TrainOutcome(trained, skipped)

    def write_profiles(self, user_ids: Sequence[str]) -> list[str]:
        """PAG: each user's profile, written by the plain base model (as the benchmark's are) from a
        seeded sample of their whole history, kept in their cache folder so forgetting removes it."""
        if not user_ids:
            return []
        settings = self.method_settings
        load = self._load_base or base_loader(self.settings().base_model, *self._placement)
        writer = ProfileWriter(
            Engine(load(), LoraSpec(), slots=2),  # every row in slot 0: the base model alone
            self.task(),
            items=settings.profile_items,
            seed=settings.seed,
            max_new_tokens=settings.profile_tokens,
        )
        users = []
        for user_id in user_ids:
            try:
                users.append(self.data_user(user_id))
            except UserError:  # forgotten since they trained
                continue
        written = writer.profiles(users, split=None)
        kept = []
        for user_id, profile in written.items():
            if self.store.write_guard is not None:
                self.store.write_guard()
            relative = f"{cache_of(user_id)}/{PROFILE_FILE}"
            self.store.files.write_text(relative, json.dumps(asdict(profile)))
            # A delete that came before the write above removes nothing of it; after, it removes it. So
            # look again: a user forgotten by now must not keep a profile (the delete itself writes the
            # tombstone before removing the cache, so one of the two always sees the other).
            if not self.index.has_user(user_id):
                self.store.files.remove(cache_of(user_id))
                continue
            kept.append(user_id)
        return kept

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

    def _chosen(self, user_ids: Sequence[str] | None) -> list[str]:
        known = self._existing_index().user_ids()
        if user_ids is None:
            if not known:
                raise UserError(f"no users in {self.location}: add or import users first")
            return known
        wanted = list(dict.fromkeys(user_ids))
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise UserError(f"no user(s) {', '.join(map(repr, unknown))} in {self.location}")
        return wanted

    def _default_config(self, spec: ModuleSpec) -> TrainConfig:
        settings = self.method_settings
        return TrainConfig(
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            learning_rate=kinds.of(spec).learning_rate,
            seed=settings.seed,
            users_per_step=settings.users_per_step,
        )

    def _train_group(
        self,
        task: Task,
        spec: ModuleSpec,
        members: list[tuple[User, str]],
        config: TrainConfig,
        progress: _Progress,
        on_user: Callable[[VersionRecord], None] | None,
        start_from_current: bool,
    ) -> list[str]:
        """One engine for the users of one spec: a slot per user trained together, plus slot 0. A kind
        that acts on label scores only is fitted against the shared model instead (``label_models``)."""
        # Personal jobs never open a setup's own store under ``MethodDeps.modules``; a store under a URL
        # has no folder on this machine to name there.
        modules = self.root if isinstance(self.store.files, LocalRoot) else Path.cwd()
        fitted_not_trained = not kinds.of(spec).acts_on_model
        label_fit = self.settings().label_fit
        if fitted_not_trained and label_fit != "bias":
            # A label part's prior (fusion, choice) is smoothed toward every user's labels, as the
            # benchmark's is: the fit sees the store's whole population, though it fits only ``members``.
            task = self.task([_user_of(uid, self.history(uid)) for uid in self.index.user_ids()])
        deps = MethodDeps(task, self.load_base(), modules, settings=self.method_settings)
        if fitted_not_trained:
            fitted = label_models.fit_and_store(
                deps,
                deps.engine(spec, slots=2),
                self.store,
                [user for user, _ in members],
                f"{spec.kind}",
                fingerprints={user.id: data for user, data in members},
                fit=label_fit,
            )
            for record in fitted.values():
                if on_user is not None:
                    on_user(record)
            return list(fitted)
        width = min(len(members), config.users_per_step or self.method_settings.users_per_step)
        engine = deps.engine(spec, slots=width + 1)
        builder = deps.builder(Recipe(), engine.tokenizer)
        fingerprints = {user.id: data for user, data in members}
        jobs = []
        for user, _ in members:
            # The method name only labels traced prompts: these are the benchmark's peft-KIND modules.
            job = personal_job(deps, builder, f"peft-{spec.kind}", user)
            if start_from_current:
                job.init = self._current_module(engine, user.id)
            jobs.append(job)

        def stored(user_id: str) -> None:
            record = self.store.current(user_id)
            if on_user is not None and record is not None:  # None: forgotten since it was stored
                on_user(record)

        return self.runner.train(
            engine,
            TrainWork(config, jobs, fingerprints),
            self.store,
            fresh_base=self.load_base(),
            on_progress=progress.next_group(),
            on_stored=stored,
        )

    def _current_module(self, engine: Engine, user_id: str) -> dict | None:
        """``user_id``'s current module in ``engine``'s layout, or None to start fresh: when they have
        none, or it is of another layout or base model, or it fails its checksum (a retrain is how a
        damaged module gets replaced)."""
        current = self.store.current(user_id)
        if current is None or current.base_model != engine.base.name:
            return None
        try:
            if not kinds.same_layout(kinds.spec_from_dict(current.spec), engine.spec):
                return None
            return self.store.loader(engine.spec)(user_id)
        except (ModuleFileError, ModuleSpecError):
            return None

    # ---- versions, forgetting, keys ------------------------------------------------------------------

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

    def close(self) -> None:
        self.store.close()


def train_users(
    root: str | Path,
    user_ids: Sequence[str] | None = None,
    start_from_current: bool = False,
    write_guard: Callable[[], None] | None = None,
) -> list[str]:
    """Train ``user_ids`` (default: every user whose module is out of date) of the store at ``root``,
    in this process: everything needed (task, base model, specs) is read from the store, so a server
    runs this in a worker process. Users forgotten before or while they train are left out (their
    result is discarded: the store refuses it). ``write_guard`` runs before every write (a worker's
    check that its server still runs). Returns the ids that were trained."""
    service = UserService(root)
    service.store.write_guard = write_guard
    try:
        if user_ids is not None:
            user_ids = [user_id for user_id in user_ids if service.index.has_user(user_id)]
            if not user_ids:
                return []
        return service.train(user_ids, start_from_current=start_from_current).trained
    finally:
        service.close()


def _user_of(user_id: str, records: Sequence[HistoryRecord]) -> User:
    """A data-model user with the train and validation examples of ``records`` (no history items)."""
    return User(
        id=user_id,
        train=[to_example(r) for r in records if r.split == "train"],
        val=[to_example(r) for r in records if r.split == "val"],
    )


def _select(task: Task, users: UserSelection) -> list[User]:
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


def _steps(task: Task, user: User, config: TrainConfig) -> int:
    """Optimizer steps ``user`` takes, as ``MultiUserTrainer`` counts them."""
    return config.steps(len(task.training_examples(user)))


class _Progress:
    """One progress count over every spec group (each group's trainer counts from zero), given the
    steps each group will take."""

    def __init__(self, callback: ProgressCallback | None, group_steps: Sequence[int]) -> None:
        self.callback = callback
        self.group_steps = list(group_steps)
        self.total = sum(self.group_steps)
        self.groups_started = 0
        self.reported = 0

    def next_group(self) -> ProgressCallback:
        offset = sum(self.group_steps[: self.groups_started])
        self.groups_started += 1

        def report(done: int, total: int) -> None:
            self.reported = offset + done
            if self.callback is not None:
                self.callback(self.reported, self.total)

        return report

    def finish(self) -> None:
        """The last report says done == total even when users stopped early (patience)."""
        if self.callback is not None and self.total and self.reported < self.total:
            self.callback(self.total, self.total)
