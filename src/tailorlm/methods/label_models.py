"""Personal methods that decide among a task's labels by combining a shared model with a tiny personal
part: a per-user bias over the labels fitted against the frozen shared model, the fusion of the shared
model's label distribution with the user's (and item's) label prior, and a selection per user among
their own module, their bias and their prior.

Why these exist: with about twenty labelled items per user, a module per user cannot beat what a
statistician does with the same labels (the user's prior times the item's, ``baselines.LabelPrior``). The
annotator-modelling literature's answer is a shared text model plus a few numbers per user (e.g. Davani
et al., 2022, "Dealing with Disagreements", TACL): the shared model knows the items, the user's part
knows the user.

Each user's fitted part is ``label_parts``'s; these are the setups that train the shared model, fit what
is missing and answer. The leakage test holds them to the rules every method keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tailorlm import metrics
from tailorlm.data.schema import Task, User
from tailorlm.engine.slots import SlotManager
from tailorlm.kinds.label_bias import LabelBiasSpec
from tailorlm.methods.baselines import LabelPrior
from tailorlm.methods.deps import MethodDeps
from tailorlm.methods.label_parts import (
    FUSION_WEIGHTS,
    Distribution,
    best_setting,
    decide,
    fuse,
    golds_of,
    has_label,
    prior_distribution,
    queries_of,
    select_per_user,
    shared_distribution,
)
from tailorlm.methods.personal import PersonalSetup, PersonalTraining, train_personal
from tailorlm.methods.recipes import Purpose, Recipe
from tailorlm.methods.setups import (
    OPPU_SHRUNK,
    TASK_ADAPTER,
    Answerer,
    Query,
    TaskAdapterSetup,
    prompts_for,
)
from tailorlm.store.store import ModuleStore
from tailorlm.train.joint import JointTrainer, LabelExample


@dataclass
class LabelAnswerer:
    """Answers every (user, example) from a function of the queries to label distributions; the same
    duck type as ``setups.Answerer`` for ``setups.answer_users``."""

    task: Task
    distribution_of: Callable[[Sequence[Query]], Distribution]
    group_size: int

    def answer(self, queries: Sequence[Query], decoding: str) -> list[str]:
        if decoding not in ("likelihood", "median"):
            raise ValueError(
                f"label-distribution methods answer under the task's metric ('likelihood'); {decoding!r} "
                "does not apply to them"
            )
        return decide(self.task, self.distribution_of(queries)) if queries else []


def by_distribution(answerer: Answerer) -> LabelAnswerer:
    """``answerer``'s label distribution (each row's user in their slot), answered under the metric."""

    def distribution_of(queries: Sequence[Query]) -> Distribution:
        return shared_distribution(answerer, queries, "answer")

    return LabelAnswerer(answerer.deps.task, distribution_of, answerer.group_size)


# The joint shared model's penalty on its training users' biases, in units of one example's loss (as
# ``SHRINKAGE_GRID``): the middle of that grid, fixed because choosing it would train the model once per
# value. Test users' biases are still tuned on the grid against the frozen model.
JOINT_SHRINKAGE = 3.0


class JointSharedSetup(TaskAdapterSetup):
    """The shared model trained jointly with a bias per training user (``train.joint``): one LoRA on the
    same pooled examples of the same other users as the task adapter, but trained to choose among the
    task's labels with each user's leaning (their bias, shrunk toward zero) taken out. Stored as the
    task adapter is, and merged into the base the same way."""

    STORE = "joint-shared"

    def train(
        self, deps: MethodDeps, recipe: Recipe, store: ModuleStore, train: list[Query], val: list[Query]
    ) -> None:
        task = deps.task
        train, val = labelled_queries(task, train), labelled_queries(task, val)
        engine = deps.engine(TASK_ADAPTER.spec, slots=2)
        builder = deps.builder(recipe, engine.tokenizer)
        name = self.store_name(recipe)

        def examples(queries: list[Query], purpose: Purpose) -> list[LabelExample]:
            prompts = prompts_for(deps, builder, name, purpose, queries, self.USER)
            return [
                LabelExample(user.id, prompt, metrics.label_index(example.targets[0], task.labels))
                for prompt, (user, example) in zip(prompts, queries, strict=True)
            ]

        config = self.train_config(deps)
        deps.reporter.log(
            f"training the joint shared model ({recipe.tag}) on {len(train)} examples of "
            f"{len({u.id for u, _ in train})} other users, a bias each (shrinkage {JOINT_SHRINKAGE:g})"
        )
        trainer = JointTrainer(engine, task.labels, config, JOINT_SHRINKAGE)
        result = trainer.run(
            self.USER,
            examples(train, "train"),
            examples(val, "validate"),
            on_progress=deps.reporter.progress(f"joint shared model ({recipe.tag})"),
        )
        store.put(
            self.USER,
            engine.spec,
            result.module,
            model=engine.model,
            base_name=engine.base.name,
            meta=result.meta(JOINT_SHRINKAGE),
        )


def labelled_queries(task: Task, queries: Sequence[Query]) -> list[Query]:
    """The queries whose target is one of ``task.labels``."""
    return [(user, example) for user, example in queries if has_label(task, example)]


class BiasSetup:
    """A shared model (the task adapter, or the joint shared model) merged into the base, with a
    label-bias module per user (``kinds.label_bias``) fitted against it frozen (a bias shrunk toward zero,
    or with ``fit`` "select" the best of that, the user's prior and their fusion), stored like any user's
    module and served from a slot. A new user fits only their own bias: nothing shared changes.

    The shrinkage is chosen once per store, on the validation items of the users fitted first, and kept
    in the store's index so that users fitted later (a resumed run) get the same."""

    def __init__(
        self, shared: TaskAdapterSetup | None = None, store: str = "task-adapter+bias", fit: str = "bias"
    ) -> None:
        self.shared = shared or TaskAdapterSetup()
        self.store = store
        self.fit = fit  # what each user's part is fitted as: one of ``FITS``

    def store_name(self, recipe: Recipe) -> str:
        return f"{self.store}-{recipe.tag}"

    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> LabelAnswerer:
        return by_distribution(self.answerer(deps, method, recipe, users))

    def answerer(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> Answerer:
        """An answerer whose slots hold each user's bias (its scores are the shared model's plus the
        user's bias), every missing bias fitted and stored first."""
        task = deps.task
        spec = LabelBiasSpec(tuple(task.labels))
        base = self.shared.merged_base(deps, recipe)
        engine = deps.engine(spec, slots=deps.settings.answer_group + 1, base=base)
        builder = deps.builder(recipe, engine.tokenizer)
        store = deps.store(self.store_name(recipe))
        missing = [u for u in users if not store.has(u.id)]
        train_personal(deps, engine, store, missing, PersonalTraining(method, builder, fit=self.fit))
        slots = SlotManager(engine.bank, store.loader(spec))
        return Answerer(deps, method, engine, builder, slots.capacity, slots=slots)


class FusionSetup:
    """The task adapter's label distribution fused with the user's and the item's label prior
    (``baselines.LabelPrior``), the weight chosen on the users' validation items."""

    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> LabelAnswerer:
        task = deps.task
        shared = TaskAdapterSetup().prepare(deps, method, recipe, users)
        prior = LabelPrior(task)
        val = queries_of(users, "val", task)
        val_shared, val_prior = shared_distribution(shared, val, "validate"), prior_distribution(prior, val)
        weight, _ = best_setting(
            task,
            FUSION_WEIGHTS,
            golds_of(val),
            lambda value: decide(task, fuse(val_shared, val_prior, value)),
        )
        deps.reporter.log(f"{method}: weight {weight:g} on the shared model, chosen on validation items")

        def distribution_of(queries: Sequence[Query]) -> Distribution:
            return fuse(
                shared_distribution(shared, queries, "answer"), prior_distribution(prior, queries), weight
            )

        return LabelAnswerer(task, distribution_of, shared.group_size)


class SelectSetup:
    """OPPU with shrinkage and a selection per user: each user is answered by whichever of their own module
    (OPPU, shrunk toward the task adapter), their bias on the task adapter, or their prior did best on
    their own validation items. Ties go to the option that did best over every user's validation items."""

    MODULE_METHOD = "oppu-shrink"  # the module store this method shares with that method's row

    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> LabelAnswerer:
        task = deps.task
        personal = PersonalSetup(OPPU_SHRUNK, on_task_adapter=True).prepare(
            deps, self.MODULE_METHOD, recipe, users
        )
        biased = BiasSetup().answerer(deps, method, recipe, users)
        prior = LabelPrior(task)
        sources: dict[str, Callable[[Sequence[Query], Purpose], Distribution]] = {
            "prior": lambda q, purpose: prior_distribution(prior, q),
            "bias": lambda q, purpose: shared_distribution(biased, q, purpose),
            "module": lambda q, purpose: shared_distribution(personal, q, purpose),
        }
        val = queries_of(users, "val", task)
        predictions = {option: decide(task, source(val, "validate")) for option, source in sources.items()}
        chosen = select_per_user(task, users, val, predictions)
        counts = {option: sum(1 for c in chosen.values() if c == option) for option in sources}
        deps.reporter.log(f"{method}: users answered by " + ", ".join(f"{o} {n}" for o, n in counts.items()))

        def distribution_of(queries: Sequence[Query]) -> Distribution:
            out = torch.empty(len(queries), len(task.labels))
            for option in sources:
                rows = [i for i, (user, _) in enumerate(queries) if chosen.get(user.id, "prior") == option]
                if rows:
                    out[rows] = sources[option]([queries[i] for i in rows], "answer")
            return out

        return LabelAnswerer(task, distribution_of, biased.group_size)
