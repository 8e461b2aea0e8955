"""Training a personal part: the one road by which a user's own module is made, for the benchmark's
per-user methods and the users service alike.

How a kind's part is made is the kind's to say (``ModuleKind.made_by``), and ``MAKERS`` maps that to the
function that makes it: "loss", the language-model loss over the user's own examples, many users per
optimizer step (``train.jobs``: resumable, each user stored as they finish, on this process or Ray);
"label-fit", a fit against the frozen shared model's label scores on the user's labelled items
(``label_parts``); "fold-in", a closed-form fit of the user's own answers against what the task froze
(``methods.collab``). A new kind that declares one of these is trained and stored with no other change; a
new way of making a part is one more entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from tailorlm import kinds
from tailorlm.data.schema import Task, User
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.kinds import ModuleSpec
from tailorlm.methods import label_parts
from tailorlm.methods.deps import MethodDeps, MethodSettings
from tailorlm.methods.recipes import PromptBuilder, Recipe
from tailorlm.methods.setups import (
    Answerer,
    ModuleRecipe,
    TaskAdapterSetup,
    personal_job,
    refuse_adapter_users,
)
from tailorlm.models import BaseModel
from tailorlm.progress import ProgressCallback
from tailorlm.store.module_folder import NonFiniteModuleError
from tailorlm.store.store import ModuleStore
from tailorlm.train.jobs import StoredCallback, TrainWork
from tailorlm.train.trainer import TrainConfig

InitialModule = Callable[[str], Mapping | None]  # a user id -> the module to start from (None: fresh)


def personal_config(settings: MethodSettings, learning_rate: float, weight_decay: float = 0.0) -> TrainConfig:
    """The training settings of a personal module: ``settings``' epochs, batch size, seed and users per
    step, with the kind's (or the method's) learning rate and weight decay."""
    return TrainConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        seed=settings.seed,
        users_per_step=settings.users_per_step,
    )


def work_units(spec: ModuleSpec, task: Task, users: Sequence[User], config: TrainConfig) -> int:
    """What ``train_personal``'s progress counts to for ``users`` of ``spec``: optimizer steps of a part
    made by the loss (as ``MultiUserTrainer`` counts them), users of a fitted one."""
    if kinds.of(spec).made_by == "loss":
        return sum(config.steps(len(task.training_examples(user))) for user in users)
    return len(users)


@dataclass(frozen=True)
class PersonalTraining:
    """How to make a group of users' parts, beside the users themselves.

    ``method`` names the parts in traced prompts and log lines. ``config`` trains a part made by the loss
    (None: ``personal_config`` with the kind's own learning rate). ``fit`` is how a label-fit kind's parts
    are fitted (``label_parts.FITS``); ``population``, when given, is the task with every user's data, for
    a fit whose prior is smoothed toward all users' labels (default: ``deps.task``'s users).
    ``fingerprints`` (user id -> the fingerprint of the data they train on) are stored with each module.
    ``initial`` gives a user's module to continue from (a retrain after new history). ``fresh_base``
    loads another copy of the engine's base for a runner that trains elsewhere. ``fold_in`` gives a
    fold-in kind's module of a user, fitted from their own answers against what the task froze, and
    ``folded_against`` is that frozen part's fingerprint, kept in each module's metrics."""

    method: str
    builder: PromptBuilder
    config: TrainConfig | None = None
    fit: str = "bias"
    population: Callable[[], Task] | None = None
    fingerprints: Mapping[str, str] | None = None
    initial: InitialModule | None = None
    fresh_base: Callable[[], BaseModel] | None = None
    fold_in: Callable[[User], Mapping[str, torch.Tensor]] | None = None
    folded_against: str | None = None


def train_personal(
    deps: MethodDeps,
    engine: Engine,
    store: ModuleStore,
    users: Sequence[User],
    training: PersonalTraining,
    on_progress: ProgressCallback | None = None,
    on_stored: StoredCallback | None = None,
) -> list[str]:
    """Make each of ``users``' own part in ``engine``'s layout (``engine.spec``; slot 0 the shared model)
    from their own data only, and store it as a new version of their module; returns the ids stored, in
    the order they were. ``on_stored`` hears each user the moment they are stored; ``on_progress`` hears
    (done, total) in the maker's own unit (optimizer steps, or users fitted)."""
    if not users:
        return []
    made_by = kinds.of(engine.spec).made_by
    if made_by not in MAKERS:
        raise ValueError(f"no way to make a part that is made by {made_by!r}: one of {', '.join(MAKERS)}")
    return MAKERS[made_by](deps, engine, store, users, training, on_progress, on_stored)


def _by_loss(
    deps: MethodDeps,
    engine: Engine,
    store: ModuleStore,
    users: Sequence[User],
    training: PersonalTraining,
    on_progress: ProgressCallback | None,
    on_stored: StoredCallback | None,
) -> list[str]:
    """The language-model loss over each user's training examples, validated on their validation items
    (``setups.personal_job``), many users per step, on ``deps.runner``."""
    jobs = []
    for user in users:
        job = personal_job(deps, training.builder, training.method, user)
        if training.initial is not None:
            job.init = training.initial(user.id)
        jobs.append(job)
    config = training.config or personal_config(deps.settings, kinds.of(engine.spec).learning_rate)
    work = TrainWork(config, jobs, training.fingerprints)
    return deps.runner.train(engine, work, store, training.fresh_base, on_progress, on_stored)


def _by_label_fit(
    deps: MethodDeps,
    engine: Engine,
    store: ModuleStore,
    users: Sequence[User],
    training: PersonalTraining,
    on_progress: ProgressCallback | None,
    on_stored: StoredCallback | None,
) -> list[str]:
    """A label part per user against the frozen shared model (``label_parts.fit_and_store``)."""
    if training.population is not None and training.fit != "bias":
        deps = replace(deps, task=training.population())
    records = label_parts.fit_and_store(
        deps,
        engine,
        store,
        users,
        training.method,
        builder=training.builder,
        fingerprints=training.fingerprints,
        fit=training.fit,
    )
    stored = list(records)
    for done, user_id in enumerate(stored, 1):
        _heard(user_id, done, len(stored), on_progress, on_stored)
    return stored


def _by_fold_in(
    deps: MethodDeps,
    engine: Engine,
    store: ModuleStore,
    users: Sequence[User],
    training: PersonalTraining,
    on_progress: ProgressCallback | None,
    on_stored: StoredCallback | None,
) -> list[str]:
    """Each user's module fitted from their own answers against the task's frozen part
    (``training.fold_in``, e.g. ``methods.collab``'s item factors): no model runs, nobody else changes."""
    if training.fold_in is None:
        raise ValueError(
            f"a {engine.spec.kind} module is folded in against what its task froze, and none was given"
        )
    stored = []
    for done, user in enumerate(users, 1):
        try:
            _put_folded(deps, engine, store, user, training)
        except NonFiniteModuleError:  # not stored, as the trainer stores no diverged module; the rest go on
            continue
        stored.append(user.id)
        _heard(user.id, done, len(users), on_progress, on_stored)
    return stored


def _put_folded(
    deps: MethodDeps, engine: Engine, store: ModuleStore, user: User, training: PersonalTraining
) -> None:
    """``user``'s folded-in module, stored as a new version with what it was folded in against."""
    store.put(
        user.id,
        engine.spec,
        training.fold_in(user),
        model=engine.model,
        base_name=engine.base.name,
        meta={
            "made_by": "fold-in",
            "examples": len(deps.task.training_examples(user)),
            "folded_against": training.folded_against,
        },
        data_fingerprint=(training.fingerprints or {}).get(user.id),
    )


def _heard(
    user_id: str,
    done: int,
    total: int,
    on_progress: ProgressCallback | None,
    on_stored: StoredCallback | None,
) -> None:
    """Tell the callbacks that ``user_id`` is stored, the ``done``-th of ``total``."""
    if on_stored is not None:
        on_stored(user_id)
    if on_progress is not None:
        on_progress(done, total)


Maker = Callable[
    [
        MethodDeps,
        Engine,
        ModuleStore,
        Sequence[User],
        PersonalTraining,
        ProgressCallback | None,
        StoredCallback | None,
    ],
    list[str],
]
MAKERS: dict[str, Maker] = {"loss": _by_loss, "label-fit": _by_label_fit, "fold-in": _by_fold_in}


class PersonalSetup:
    """A module per user, trained on that user's own examples only (``train_personal``), many users per
    step, from the bare base (PEFT-U) or on the merged task adapter (OPPU)."""

    def __init__(self, recipe: ModuleRecipe, on_task_adapter: bool = False) -> None:
        self.recipe = recipe
        self.on_task_adapter = on_task_adapter

    def build_base(self, deps: MethodDeps, prompt_recipe: Recipe) -> BaseModel:
        """A fresh base, with the task adapter merged into it for OPPU."""
        if self.on_task_adapter:
            return TaskAdapterSetup().merged_base(deps, prompt_recipe)
        return deps.load_base()

    def build_engine(self, deps: MethodDeps, prompt_recipe: Recipe) -> Engine:
        """An engine on a fresh base (``build_base``) with a slot per user of a step."""
        base = self.build_base(deps, prompt_recipe)
        return deps.engine(self.recipe.spec, slots=deps.settings.users_per_step + 1, base=base)

    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> Answerer:
        if self.on_task_adapter:
            refuse_adapter_users(deps, users)
        settings = deps.settings
        engine = self.build_engine(deps, recipe)
        if recipe.profile:
            deps.profiles.ensure(users)
        builder = deps.builder(recipe, engine.tokenizer)
        store = deps.store(method)
        # Only users the store lacks are trained: a resumed run keeps the modules it has.
        missing = [u for u in users if not store.has(u.id)]
        if missing:
            deps.reporter.log(
                f"{method}: training {len(missing)} users' modules, {settings.users_per_step} per step"
            )
            config = personal_config(settings, self.recipe.learning_rate, self.recipe.weight_decay)
            training = PersonalTraining(
                method, builder, config, fresh_base=lambda: self.build_base(deps, recipe)
            )
            train_personal(
                deps, engine, store, missing, training, deps.reporter.progress(f"{method}: training")
            )
            diverged = [u.id for u in missing if not store.has(u.id)]
            if diverged:  # the trainer stores no module with NaN or inf values (``train.jobs.train_group``)
                raise ValueError(
                    f"{method}: the training of {len(diverged)} users diverged (their modules came out with "
                    f"NaN or infinite values: {', '.join(diverged[:5])}{', ...' if len(diverged) > 5 else ''}"
                    "); the others are stored and kept. Try a lower learning rate"
                )
        slots = SlotManager(engine.bank, store.loader(engine.spec))
        return Answerer(deps, method, engine, builder, slots.capacity, slots=slots)
