"""Training a store's users: the out-of-date ones (no module, history or spec changed since), many users
per step on one engine per module spec, each stored the moment they finish with the fingerprint of the
history they saw, so a killed run resumes where it stopped; then each trained user's PAG profile. A user
forgotten meanwhile is left out: the store refuses their version and their profile is not kept."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tailorlm import kinds
from tailorlm.data.schema import Task, User
from tailorlm.engine.engine import Engine
from tailorlm.kinds import ModuleSpec, ModuleSpecError
from tailorlm.kinds.lora import LoraSpec
from tailorlm.methods.deps import MethodDeps, MethodSettings, base_loader
from tailorlm.methods.personal import PersonalTraining, personal_config, train_personal, work_units
from tailorlm.methods.profiles import ProfileWriter
from tailorlm.methods.recipes import Recipe
from tailorlm.progress import ProgressCallback
from tailorlm.store.index import VersionRecord
from tailorlm.store.module_folder import ModuleFileError
from tailorlm.store.roots import LocalRoot
from tailorlm.train.jobs import TrainRunner
from tailorlm.train.trainer import TrainConfig
from tailorlm.users.errors import UserError
from tailorlm.users.history import fingerprint, user_of
from tailorlm.users.identity import cache_of
from tailorlm.users.lifecycle import PROFILE_FILE, Lifecycle

# Why a user who trained was not stored when they were not forgotten meanwhile (``train.jobs.train_group``).
DIVERGED = (
    "their training diverged (the module came out with NaN or infinite values): not stored, their "
    "previous version is kept; try a lower learning rate"
)


@dataclass(frozen=True)
class TrainOutcome:
    trained: list[str]  # in the order they finished (and were stored)
    skipped: dict[str, str]  # user id -> why they were not trained


class Training(Lifecycle):
    """Training users of the store. The service sets ``method_settings`` (the benchmark's training
    defaults) and ``runner`` (where groups train)."""

    method_settings: MethodSettings
    runner: TrainRunner

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
        chosen = self._chosen(user_ids)
        try:
            return self._train(
                chosen, user_ids is not None, changed_only, config, on_progress, on_user, start_from_current
            )
        finally:  # a later put of these users (not this training's) is no longer tied to what it read
            for user_id in chosen:
                self.store.incarnations.pop(user_id, None)

    def _train(
        self,
        chosen: list[str],
        explicit: bool,
        changed_only: bool,
        config: TrainConfig | None,
        on_progress: ProgressCallback | None,
        on_user: Callable[[VersionRecord], None] | None,
        start_from_current: bool,
    ) -> TrainOutcome:
        task = self.task()
        skipped: dict[str, str] = {}
        groups: dict[str, tuple[ModuleSpec, list[tuple[User, str]]]] = {}
        for user_id in chosen:
            # Before the history is read: a version or profile from it is kept only for this incarnation.
            incarnation = self.index.incarnation(user_id)
            if incarnation is not None:
                self.store.incarnations[user_id] = incarnation
            records = self.index.history(user_id)
            if not records and not self.index.has_user(user_id):
                skipped[user_id] = "forgotten"  # since the list of users was read
                continue
            user = user_of(user_id, records)
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
        plans = [
            (spec, members, config or personal_config(self.method_settings, kinds.of(spec).learning_rate))
            for spec, members in groups.values()
        ]
        progress = _Progress(on_progress, [work_units(s, task, [u for u, _ in m], c) for s, m, c in plans])
        trained: list[str] = []
        for spec, members, group_config in plans:
            stored = self._train_group(
                task, spec, members, group_config, progress, on_user, start_from_current
            )
            trained += stored
            for user, _ in members:  # the trainer stores everyone but the forgotten and the diverged
                if user.id not in stored:
                    skipped[user.id] = "forgotten" if not self.index.has_user(user.id) else DIVERGED
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
            expected = self.store.incarnations.get(user_id)
            now = self.index.incarnation(user_id)
            if now is None or (expected is not None and now != expected):
                self.store.files.remove(cache_of(user_id))
                continue
            kept.append(user_id)
        return kept

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
        """One engine for the users of one spec, slot 0 the shared model: each user's part made as its
        kind says (``train_personal``: by the loss, a slot per user trained together; or fitted)."""
        # Personal jobs never open a setup's own store under ``MethodDeps.modules``; a store under a URL
        # has no folder on this machine to name there.
        modules = self.root if isinstance(self.store.files, LocalRoot) else Path.cwd()
        deps = MethodDeps(task, self.load_base(), modules, settings=self.method_settings, runner=self.runner)
        width = min(len(members), config.users_per_step or self.method_settings.users_per_step)
        engine = deps.engine(spec, slots=width + 1)

        def population() -> Task:
            # A label part's prior (fusion, select) is smoothed toward every user's labels, as the
            # benchmark's is: the fit sees the store's whole population, though it fits only ``members``.
            return self.task([user_of(uid, self.history(uid)) for uid in self.index.user_ids()])

        def initial(user_id: str) -> Mapping | None:
            return self._current_module(engine, user_id) if start_from_current else None

        def stored(user_id: str) -> None:
            record = self.store.current(user_id)
            if on_user is not None and record is not None:  # None: forgotten since it was stored
                on_user(record)

        training = PersonalTraining(
            # The method name only labels traced prompts: these are the benchmark's peft-KIND modules.
            f"peft-{spec.kind}",
            deps.builder(Recipe(), engine.tokenizer),
            config,
            fit=self.settings().label_fit,
            population=population,
            fingerprints={user.id: data for user, data in members},
            initial=initial,
            fresh_base=deps.load_base,
            **self._fold_in(spec, task),
        )
        users = [user for user, _ in members]
        return train_personal(deps, engine, self.store, users, training, progress.next_group(), stored)

    def _fold_in(self, spec: ModuleSpec, task: Task) -> dict[str, Any]:
        """A fold-in kind's ``PersonalTraining`` fields: the maker of a user's module, fitted from their
        history's answers against the item factors of the store's collab part (``UserError`` when it has
        none), and those items' fingerprint, which the module keeps; nothing for other kinds."""
        if kinds.of(spec).made_by != "fold-in":
            return {}
        items = self.collab_part(spec).items
        return {"fold_in": lambda user: items.module(task, user), "folded_against": items.fingerprint()}

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
