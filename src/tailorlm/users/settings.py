"""What a store's users share, and the store a service works on: the task their history came from
(rendered into prompts with that task's templates), the base model their modules are for (with the OPPU
task adapter merged in), and the module spec a user without their own has. Kept in the index's ``meta``
table, so a worker process given only the store's root finds them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tailorlm import kinds
from tailorlm.data import UnknownTaskError
from tailorlm.data import build as data_build
from tailorlm.data import specs as task_specs
from tailorlm.data.schema import Task, User
from tailorlm.files import atomic_folder
from tailorlm.kinds import ModuleSpec, ModuleSpecError
from tailorlm.kinds.collab import CollabSpec
from tailorlm.methods import label_parts
from tailorlm.methods.blend_part import BlendPart, BlendPartError
from tailorlm.methods.collab import CollabPart, CollabPartError, tensors_fingerprint
from tailorlm.methods.deps import BaseLoader, base_loader
from tailorlm.methods.setups import PERSONAL_KINDS
from tailorlm.models import BaseModel
from tailorlm.store import module_folder
from tailorlm.store.index import StoreIndex
from tailorlm.store.module_folder import ModuleFileError
from tailorlm.store.store import ModuleStore
from tailorlm.users.errors import UserError

SETTINGS_KEY = "users.settings"  # the index meta row holding ServiceSettings as JSON
DEFAULT_KIND = "lora"
TASK_ADAPTER_FOLDER = ".task-adapter"  # hidden, so no user's module folder can take its name
COLLAB_FOLDER = ".collab"  # the task's collab part (methods.collab.CollabPart), hidden likewise
BLEND_FOLDER = ".blend"  # the task's blend part (methods.blend_part.BlendPart), hidden likewise


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
    # Collab users' shared part (the MLP and the item factors they are folded in against), kept in the
    # store (COLLAB_FOLDER); None: the store cannot train or serve collab users.
    collab: str | None = None
    collab_items: str | None = None  # the fingerprint of its item factors (``ItemFactors.fingerprint``)
    # The stacked blend's part (the item statistics and the fitted blender), kept in the store
    # (BLEND_FOLDER): label requests that name an item are answered with the blend; None: they are not.
    blend: str | None = None
    label_fit: str = "bias"  # how label-bias users are fitted: one of ``label_parts.FITS``
    # The whole spec of a task that is not bundled (your own task file, ``TaskSpec.to_dict``): the store
    # renders prompts from it without the file; None for a bundled task, found by its name.
    task_spec: dict[str, Any] | None = None
    spec: dict[str, Any] = field(default_factory=lambda: default_spec_dict(DEFAULT_KIND))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServiceSettings:
        # Settings a newer version wrote and this one does not know are left out, not an error.
        values = {k: v for k, v in json.loads(text).items() if k in cls.__dataclass_fields__}
        if values.get("labels") is not None:
            values["labels"] = tuple(values["labels"])
        if "label_fit" in values:  # a store configured under a fit's earlier name
            values["label_fit"] = label_parts.FORMER_FITS.get(values["label_fit"], values["label_fit"])
        return cls(**values)


def check_label_fit(fit: str) -> str:
    """``fit`` under its current name, if label-bias users can be fitted that way (``label_parts.FITS``)."""
    fit = label_parts.FORMER_FITS.get(fit, fit)
    if fit not in label_parts.FITS:
        raise UserError(f"label fit {fit!r} is not one of {', '.join(label_parts.FITS)}")
    return fit


def default_spec_dict(kind: str) -> dict[str, Any]:
    """The spec the benchmark's per-user method of ``kind`` uses (``methods.setups.PERSONAL_KINDS``)."""
    return kinds.spec_to_dict(PERSONAL_KINDS[kind].spec)


def resolve_spec(
    kind: str | ModuleSpec, labels: Sequence[str] | None = None, shared: ModuleSpec | None = None
) -> ModuleSpec:
    """A module spec from a kind's name (its default settings) or a spec, checked by its kind; a kind over
    a task's labels (a label bias) gets ``labels``, the store task's, and the name of the kind whose
    shared part the store keeps gets that part's spec (``shared``)."""
    if shared is not None and kind == shared.kind:
        return shared
    try:
        spec = kinds.validate(kinds.default_spec(kind) if isinstance(kind, str) else kind)
        return kinds.for_labels(spec, labels)
    except ModuleSpecError as error:
        raise UserError(str(error)) from error


def module_of_store(folder: Path) -> Path:
    """``folder`` itself, or when it holds a module store (a bench run's ``modules/task-adapter-TAG``), the
    folder of the current version of its one module; a ``UserError`` when that store holds other than one."""
    store = ModuleStore(folder)
    if not store.exists():
        return folder
    try:
        users = [u for u in store.users() if store.current(u) is not None]
        if len(users) != 1:
            raise UserError(
                f"{folder} is a module store of {len(users)} modules: give the folder of one module "
                "(a bench run's modules/task-adapter-TAG holds exactly one)"
            )
        return store.folder(users[0])
    finally:
        store.close()


def read_blend_part(folder: str | Path, what: str = "blend part") -> BlendPart:
    """A blend part folder (a bench run's ``modules/blend-part-TAG``), or a ``UserError`` naming ``what``
    and what is wrong with it."""
    try:
        return BlendPart.load(Path(folder))
    except BlendPartError as error:
        raise UserError(f"{what}: {error}") from None


def read_collab_part(folder: str | Path, what: str = "collab part") -> CollabPart:
    """A collab part folder (a bench run's ``modules/collab-shared-TAG``), or a ``UserError`` naming
    ``what`` and what is wrong with it."""
    try:
        return CollabPart.load(Path(folder))
    except CollabPartError as error:
        raise UserError(f"{what}: {error}") from None


class StoreSettings:
    """The store a service works on and its store-wide settings. The service sets ``store``,
    ``_load_base`` (None: the store's base model) and ``_placement`` (device, dtype)."""

    store: ModuleStore
    _load_base: BaseLoader | None
    _placement: tuple[str | None, str | None]

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
        collab: str | Path | None = None,
        blend: str | Path | None = None,
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
        if collab is not None:
            kept, items = self._keep_collab(Path(collab), settings.task_adapter)
            settings = replace(settings, collab=kept, collab_items=items)
        if blend is not None:
            settings = replace(settings, blend=self._keep_blend(Path(blend), settings))
        if label_fit is not None:
            settings = replace(settings, label_fit=check_label_fit(label_fit))
        return self._save_settings(settings)

    def _keep_task_adapter(self, folder: Path) -> str:
        """Copy a task adapter's module folder into the store (users' modules depend on it, so it must not
        change or vanish under them); returns its folder relative to the root. ``folder`` is a module's
        folder, or a bench run's store of the task adapter (``RUN/modules/task-adapter-TAG``), whose one
        module's current version is taken."""
        if self.store.users():
            raise UserError(
                f"the modules in {self.location} were trained without this task adapter; "
                "use a new store for it"
            )
        folder = module_of_store(folder)
        try:
            stored = module_folder.read_module(folder)
        except ModuleFileError as error:
            raise UserError(f"task adapter: {error}") from None
        if not kinds.of(stored.spec).mergeable:
            raise UserError(
                f"a {stored.spec.kind} task adapter cannot be merged into the base; use LoRA or IA3"
            )
        return self._keep_folder(folder, TASK_ADAPTER_FOLDER)

    def _keep_collab(self, folder: Path, task_adapter: str | None) -> tuple[str, str]:
        """Copy a collab part's folder into the store (collab users' vectors are folded in against its
        items, so it must not change under them); returns its folder relative to the root and its items'
        fingerprint. Refused when ``task_adapter`` (the store's, if it has one yet) is not the one its MLP
        was trained over."""
        if any(isinstance(self._stored_spec(u), CollabSpec) for u in self.store.users()):
            raise UserError(
                f"the collab users of {self.location} were folded in against another collab part; "
                "use a new store for this one"
            )
        part = read_collab_part(folder)
        if task_adapter is not None:
            self._check_task_adapter("collab part's MLP was trained", part.task_adapter, task_adapter)
        return self._keep_folder(folder, COLLAB_FOLDER), part.items.fingerprint()

    def _keep_blend(self, folder: Path, settings: ServiceSettings) -> str:
        """Copy a blend part's folder into the store; returns its folder relative to the root. Refused
        when its labels are not the store task's, or its model source was fitted on another task adapter
        than the store merges into its base."""
        part = read_blend_part(folder)
        self._check_blend(part, settings)
        return self._keep_folder(folder, BLEND_FOLDER)

    def _check_blend(self, part: BlendPart, settings: ServiceSettings) -> None:
        if settings.labels is not None and tuple(settings.labels) != part.labels:
            raise UserError(
                f"the blend part is for the labels {list(part.labels)}, the store's task has "
                f"{list(settings.labels)}: give the part of a bench run of this task"
            )
        if part.uses_model:
            what = "blend part's model source was fitted"
            self._check_task_adapter(what, part.task_adapter, settings.task_adapter)

    def blend_part(self) -> BlendPart | None:
        """The store's blend part, checked against the store's labels and task adapter; None without one;
        a ``UserError`` saying what to do when it does not fit."""
        settings = self.settings()
        if settings.blend is None:
            return None
        with self.store.files.reading(settings.blend) as folder:
            part = read_blend_part(folder, "the store's blend part")
        self._check_blend(part, settings)
        return part

    def _keep_folder(self, folder: Path, relative: str) -> str:
        """Copy the files of ``folder`` into the store at ``relative``, replacing what was there in one
        step; returns ``relative``."""
        with self.store.files.new_folder(relative) as target, atomic_folder(target) as staging:
            for item in folder.iterdir():
                if item.is_file():
                    shutil.copy2(item, staging / item.name)
        return relative

    def _stored_spec(self, user_id: str) -> ModuleSpec | None:
        record = self.store.current(user_id)
        return kinds.spec_from_dict(record.spec) if record is not None else None

    def collab_spec(self) -> ModuleSpec | None:
        """The spec of the store's collab part, None without one (what ``--kind collab`` resolves to)."""
        return self.collab_part().spec if self.settings().collab is not None else None

    def collab_part(self, spec: ModuleSpec | None = None) -> CollabPart:
        """The store's collab part, checked against the task adapter merged into the base and against
        ``spec`` (the collab users' spec): a ``UserError`` saying what to do when it does not fit."""
        relative = self.settings().collab
        if relative is None:
            raise UserError(
                f"{self.location} keeps no collab part, which collab users are folded in against and "
                "served with: import with --collab RUN/modules/collab-shared-TAG (a bench run of the "
                "collab method), with that run's --task-adapter"
            )
        with self.store.files.reading(relative) as folder:
            part = read_collab_part(folder, "the store's collab part")
        if spec is not None and spec != part.spec:
            raise UserError(
                f"the store's collab part is for {part.spec}, not {spec}: collab users take its spec"
            )
        self._check_task_adapter(
            "collab part's MLP was trained", part.task_adapter, self.settings().task_adapter
        )
        return part

    def collab_items_fingerprint(self) -> str | None:
        """The fingerprint of the store's collab part's item factors (what collab users' vectors are folded
        in against), None without a part; kept in the settings when the part is, read from it for a store
        that kept its part before the fingerprint was."""
        settings = self.settings()
        if settings.collab is None:
            return None
        return settings.collab_items or self.collab_part().items.fingerprint()

    def shared_part(self, spec: ModuleSpec) -> dict[str, torch.Tensor]:
        """The trained part every user of ``spec`` shares (``ModuleKind.shared_shapes``), for an engine's
        bank: the store's collab part's MLP, the one kind that has one."""
        return self.collab_part(spec).shared

    def _check_task_adapter(self, what: str, fingerprint: str | None, relative: str | None) -> None:
        """The part whose ``what`` over the task adapter of ``fingerprint`` (None: over no task adapter)
        fits the one at ``relative`` in the store (None: the store merges none)."""
        merged = None
        if relative is not None:
            with self.store.files.reading(relative) as folder:
                merged = tensors_fingerprint(module_folder.read_module(folder).tensors)
        if merged != fingerprint:
            raise UserError(
                f"the {what} over "
                + ("no task adapter" if fingerprint is None else "another task adapter")
                + f" than {self.location} merges into its base "
                + ("(none)" if merged is None else "")
                + ": give the task adapter and the part of one bench run"
            )

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
    def _task_spec(task: str, kept: dict[str, Any] | None = None) -> task_specs.TaskSpec:
        """A task's spec: the one the store kept (a task file's), else the bundled task of that name."""
        if kept is not None:
            return task_specs.TaskSpec.from_dict(kept)
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
        spec = self._task_spec(settings.task, settings.task_spec)
        return data_build.task(
            spec, list(users), source=self.location, chronological=False, labels=settings.labels
        )

    def close(self) -> None:
        self.store.close()
