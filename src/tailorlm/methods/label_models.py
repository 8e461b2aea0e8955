"""Personal methods that decide among a task's labels by combining a shared model with a tiny personal
part: a per-user bias over the labels fitted against the frozen shared model, the fusion of the shared
model's label distribution with the user's (and item's) label prior, and a choice per user among their
own module, their bias and their prior.

Why these exist: with about twenty labelled items per user, a module per user cannot beat what a
statistician does with the same labels (the user's prior times the item's, ``baselines.LabelPrior``). The
annotator-modelling literature's answer is a shared text model plus a few numbers per user
(``QUALITY.md``): the shared model knows the items, the user's part knows the user.

Every distribution here is a ``[rows, labels]`` tensor of log-probabilities over ``task.labels``. Whatever
is tuned (the bias's shrinkage, the fusion weight, a user's choice) is chosen on validation items, never on
a test item; the prompts that fit or tune anything are traced like every other method's, so the leakage
test holds these methods to the same rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from tailorlm import metrics
from tailorlm.data.schema import Example, Task, User
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.kinds.label_bias import BIAS, LabelBiasSpec
from tailorlm.methods.baselines import LabelPrior, suited_label
from tailorlm.methods.deps import MethodDeps
from tailorlm.methods.recipes import PromptBuilder, Purpose, Recipe
from tailorlm.methods.setups import (
    OPPU_SHRUNK,
    TASK_ADAPTER,
    Answerer,
    PersonalSetup,
    Query,
    TaskAdapterSetup,
    prompts_for,
)
from tailorlm.progress import ProgressCallback
from tailorlm.store.index import VersionRecord
from tailorlm.store.store import ModuleStore
from tailorlm.train.choice import ChoiceExample, JointChoiceTrainer, fit_bias
from tailorlm.train.trainer import TrainConfig

# L2 strengths of a user's bias, in units of one training example's loss; the benchmark picks one on the
# validation items of the users it answers. Large values pull every user back to the shared model.
SHRINKAGE_GRID = (100.0, 30.0, 10.0, 3.0, 1.0, 0.3)  # safest (closest to the shared model) first
# Weights of the shared model in the fusion; 0 is the prior alone, so the tuned fusion is never worse
# than the prior on the items it was tuned on.
FUSION_WEIGHTS = tuple(i / 10 for i in range(11))

Distribution = torch.Tensor  # [rows, labels] log-probabilities over task.labels


def applies_to(task: Task) -> bool:
    """Label-distribution methods need one label per item from a fixed set."""
    return task.labels is not None and task.kind in ("classification", "rating")


def labelled(task: Task, examples: Sequence[Example]) -> list[Example]:
    """The examples whose target is one of ``task.labels``."""
    return [e for e in examples if e.targets and metrics.label_index(e.targets[0], task.labels) >= 0]


def decide(task: Task, distribution: Distribution) -> list[str]:
    """The label each row answers under the task's first metric (median for MAE, mean for RMSE, the most
    likely label otherwise), as the simple baselines answer."""
    return [suited_label(task, row) for row in distribution.exp().tolist()]


def validation_value(task: Task, golds: Sequence[str], predictions: Sequence[str]) -> float:
    """The task's first metric on pooled items, signed so that higher is better."""
    primary = task.metrics[0] if task.metrics else "accuracy"
    value = metrics.score([primary], golds, predictions, ["u"] * len(golds), task.labels)["pooled"][primary]
    return -value if primary in metrics.LOWER_IS_BETTER else value


# ---- the shared model's distributions ---------------------------------------------------------------


def shared_distribution(
    answerer: Answerer,
    queries: Sequence[Query],
    purpose: Purpose,
    on_progress: ProgressCallback | None = None,
) -> Distribution:
    """The shared model's label distribution for each (user, example), ``[len(queries), labels]``;
    ``on_progress`` hears (users done, users) after each user.

    Prompts for fitting (``train``) or tuning (``validate``) are traced as the user's own module's, so the
    leakage rules see them as that user's data; ``answer`` prompts as answers."""
    labels = answerer.deps.task.labels
    out = torch.empty(len(queries), len(labels))
    users = list({user.id: user for user, _ in queries}.values())
    rows_of = _by_user(queries)
    done = 0
    for start in range(0, len(users), answerer.group_size):
        group = users[start : start + answerer.group_size]
        with answerer.placed(group) as slot_of:
            for user in group:
                rows = rows_of[user.id]
                module = None if purpose == "answer" else user.id
                prompts = prompts_for(
                    answerer.deps,
                    answerer.builder,
                    answerer.method,
                    purpose,
                    [queries[i] for i in rows],
                    module,
                )
                scores = answerer.engine.score_choices(prompts, [slot_of.get(user.id, 0)] * len(rows), labels)
                out[rows] = torch.log_softmax(torch.tensor(scores, dtype=torch.float32), dim=-1)
                done += 1
                if on_progress is not None:
                    on_progress(done, len(users))
    return out


# ---- a user's bias over the labels ------------------------------------------------------------------


def with_bias(distribution: Distribution, bias: torch.Tensor) -> Distribution:
    return torch.log_softmax(distribution + bias, dim=-1)


# ---- the user's prior and its fusion with the shared model -------------------------------------------


def prior_distribution(prior: LabelPrior, queries: Sequence[Query]) -> Distribution:
    rows = [prior.distribution(user, example) for user, example in queries]
    return torch.log(torch.tensor(rows, dtype=torch.float32).clamp_min(1e-12))


def fuse(shared: Distribution, prior: Distribution, weight: float) -> Distribution:
    """``weight * log p_shared + (1 - weight) * log p_prior``, renormalised: a product of experts whose
    weight 0 is the prior alone and 1 the shared model alone."""
    return torch.log_softmax(weight * shared + (1 - weight) * prior, dim=-1)


def best_setting(
    task: Task, settings: Sequence[float], golds: Sequence[str], predict: Callable[[float], list[str]]
) -> tuple[float, dict[float, float]]:
    """The setting whose predictions score best on ``golds`` (validation items), and every setting's
    value; ties go to the earliest setting (the grids list the safest first)."""
    if not golds:
        return settings[0], {}
    values = {s: validation_value(task, golds, predict(s)) for s in settings}
    return max(settings, key=values.__getitem__), values  # max keeps the first of equals


@dataclass
class LabelAnswerer:
    """Answers every (user, example) from a function of the queries to label distributions; the same
    duck type as ``setups.Answerer`` for ``setups.answer_users``."""

    task: Task
    distribution_of: Callable[[Sequence[Query]], Distribution]
    group_size: int

    def answer(self, queries: Sequence[Query], decoding: str) -> list[str]:
        if decoding not in ("choice", "median"):
            raise ValueError(
                f"label-distribution methods answer under the task's metric ('choice'); {decoding!r} does "
                "not apply to them"
            )
        return decide(self.task, self.distribution_of(queries)) if queries else []


def queries_of(users: Sequence[User], split: str, task: Task) -> list[Query]:
    """Every (user, example) of ``split`` (``train``: what a module may train on) with a known label."""
    found: list[Query] = []
    for user in users:
        examples = task.training_examples(user) if split == "train" else getattr(user, split)
        found += [(user, e) for e in labelled(task, examples)]
    return found


# ---- the setups ---------------------------------------------------------------------------------------


def _golds(queries: Sequence[Query]) -> list[str]:
    return [example.targets[0] for _, example in queries]


def _by_user(queries: Sequence[Query]) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, (user, _) in enumerate(queries):
        rows.setdefault(user.id, []).append(i)
    return rows


@dataclass
class UserBiases:
    """Each user's bias over the labels against one shared model, at the shrinkage the validation items
    chose."""

    biases: dict[str, torch.Tensor]
    shrinkage: float

    def apply(self, distribution: Distribution, queries: Sequence[Query]) -> Distribution:
        labels = distribution.shape[1]
        bias = torch.stack([self.biases.get(user.id, torch.zeros(labels)) for user, _ in queries])
        return with_bias(distribution, bias) if queries else distribution


def fit_user_biases(
    task: Task, shared: Answerer, users: Sequence[User], shrinkage: float | None
) -> UserBiases:
    """Fit every user's bias on their training items against the frozen ``shared`` model (rows in slot 0).
    Without a given ``shrinkage``, each of ``SHRINKAGE_GRID`` is tried and the one whose biases do best on
    the users' validation items (pooled) is kept. A user's part never sees another user's items, nor
    anyone's test items."""
    train = queries_of(users, "train", task)
    progress = shared.deps.reporter.progress(f"{shared.method}: scoring training items")
    train_dist = shared_distribution(shared, train, "train", progress)
    train_rows = _by_user(train)
    targets = {
        u: [metrics.label_index(train[i][1].targets[0], task.labels) for i in rows]
        for u, rows in train_rows.items()
    }
    fits: dict[float, dict[str, torch.Tensor]] = {}

    def fitted(strength: float) -> dict[str, torch.Tensor]:
        if strength not in fits:
            fits[strength] = {
                user.id: fit_bias(train_dist[train_rows.get(user.id, [])], targets.get(user.id, []), strength)
                for user in users
            }
        return fits[strength]

    if shrinkage is None:
        val = queries_of(users, "val", task)
        val_dist = shared_distribution(shared, val, "validate")

        def predict(strength: float) -> list[str]:
            return decide(task, UserBiases(fitted(strength), strength).apply(val_dist, val))

        shrinkage, _ = best_setting(task, SHRINKAGE_GRID, _golds(val), predict)
    return UserBiases(fitted(shrinkage), shrinkage)


SHRINKAGE_KEY = "label-bias-shrinkage"  # the store index's record of the shrinkage its biases use


def fit_and_store(
    deps: MethodDeps,
    engine: Engine,
    store: ModuleStore,
    users: Sequence[User],
    method: str,
    builder: PromptBuilder | None = None,
    fingerprints: Mapping[str, str] | None = None,
) -> dict[str, VersionRecord]:
    """Fit ``users``' label biases against ``engine``'s shared model (slot 0) and store each as a new
    version of their module (``engine.spec``, a label-bias spec). The shrinkage is chosen on these users'
    validation items the first time and kept in the store's index, so users fitted later (a resumed run,
    a retrain of one user) get the same one."""
    known = store.index.meta(SHRINKAGE_KEY) if store.users() else None
    builder = builder or deps.builder(Recipe(), engine.tokenizer)
    shared = Answerer(deps, method, engine, builder, deps.settings.answer_group)  # every row in slot 0
    biases = fit_user_biases(deps.task, shared, users, None if known is None else float(known))
    store.index.set_meta(SHRINKAGE_KEY, repr(biases.shrinkage))
    records = {}
    for user in users:
        meta = {"shrinkage": biases.shrinkage, "examples": len(deps.task.training_examples(user))}
        records[user.id] = store.put(
            user.id,
            engine.spec,
            {BIAS: biases.biases[user.id]},
            model=engine.model,
            base_name=engine.base.name,
            meta=meta,
            data_fingerprint=(fingerprints or {}).get(user.id),
        )
    deps.reporter.log(
        f"{method}: {len(users)} users' biases fitted, shrinkage {biases.shrinkage:g}"
        + (" (chosen on validation items)" if known is None else " (the store's)")
    )
    return records


# The joint shared model's penalty on its training users' biases, in units of one example's loss (as
# ``SHRINKAGE_GRID``): the middle of that grid, fixed because choosing it would train the model once per
# value. Test users' biases are still tuned on the grid against the frozen model.
JOINT_SHRINKAGE = 3.0


class JointSharedSetup(TaskAdapterSetup):
    """The shared model trained jointly with a bias per training user (``train.choice``): one LoRA on the
    same pooled examples of the same other users as the task adapter, but trained to choose among the
    task's labels with each user's leaning (their bias, shrunk toward zero) taken out. Stored as the
    task adapter is, and merged into the base the same way."""

    STORE = "joint-shared"

    def train(
        self, deps: MethodDeps, recipe: Recipe, store: ModuleStore, train: list[Query], val: list[Query]
    ) -> None:
        task, settings = deps.task, deps.settings
        train, val = labelled_queries(task, train), labelled_queries(task, val)
        engine = deps.engine(TASK_ADAPTER.spec, slots=2)
        builder = deps.builder(recipe, engine.tokenizer)
        name = self.store_name(recipe)

        def examples(queries: list[Query], purpose: Purpose) -> list[ChoiceExample]:
            prompts = prompts_for(deps, builder, name, purpose, queries, self.USER)
            return [
                ChoiceExample(user.id, prompt, metrics.label_index(example.targets[0], task.labels))
                for prompt, (user, example) in zip(prompts, queries, strict=True)
            ]

        config = TrainConfig(
            epochs=settings.adapter_epochs,
            batch_size=settings.adapter_batch_size,
            learning_rate=TASK_ADAPTER.learning_rate,
            warmup_ratio=settings.adapter_warmup_ratio,
            seed=settings.seed,
        )
        deps.reporter.log(
            f"training the joint shared model ({recipe.tag}) on {len(train)} examples of "
            f"{len({u.id for u, _ in train})} other users, a bias each (shrinkage {JOINT_SHRINKAGE:g})"
        )
        trainer = JointChoiceTrainer(engine, task.labels, config, JOINT_SHRINKAGE)
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
    return [(user, example) for user, example in queries if labelled(task, [example])]


class BiasSetup:
    """A shared model (the task adapter, or the joint shared model) merged into the base, with a
    label-bias module per user (``kinds.label_bias``) fitted against it frozen and shrunk toward zero,
    stored like any user's module and served from a slot. A new user fits only their own bias: nothing
    shared changes.

    The shrinkage is chosen once per store, on the validation items of the users fitted first, and kept
    in the store's index so that users fitted later (a resumed run) get the same."""

    def __init__(self, shared: TaskAdapterSetup | None = None, store: str = "task-adapter+bias") -> None:
        self.shared = shared or TaskAdapterSetup()
        self.store = store

    def store_name(self, recipe: Recipe) -> str:
        return f"{self.store}-{recipe.tag}"

    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> LabelAnswerer:
        answerer = self.answerer(deps, method, recipe, users)

        def distribution_of(queries: Sequence[Query]) -> Distribution:
            return shared_distribution(answerer, queries, "answer")

        return LabelAnswerer(deps.task, distribution_of, answerer.group_size)

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
        if missing:
            fit_and_store(deps, engine, store, missing, method, builder=builder)
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
            task, FUSION_WEIGHTS, _golds(val), lambda w: decide(task, fuse(val_shared, val_prior, w))
        )
        deps.reporter.log(f"{method}: weight {weight:g} on the shared model, chosen on validation items")

        def distribution_of(queries: Sequence[Query]) -> Distribution:
            return fuse(
                shared_distribution(shared, queries, "answer"), prior_distribution(prior, queries), weight
            )

        return LabelAnswerer(task, distribution_of, shared.group_size)


CHOICES = ("prior", "bias", "module")  # what oppu-choice may answer a user with, simplest first


class ChoiceSetup:
    """OPPU with shrinkage and a choice per user: each user is answered by whichever of their own module
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
            "module": lambda q, purpose: shared_distribution(personal, q, purpose),
            "bias": lambda q, purpose: shared_distribution(biased, q, purpose),
            "prior": lambda q, purpose: prior_distribution(prior, q),
        }
        chosen = self._choose(task, users, sources)
        counts = {option: sum(1 for c in chosen.values() if c == option) for option in CHOICES}
        deps.reporter.log(f"{method}: users answered by " + ", ".join(f"{o} {n}" for o, n in counts.items()))

        def distribution_of(queries: Sequence[Query]) -> Distribution:
            out = torch.empty(len(queries), len(task.labels))
            for option in CHOICES:
                rows = [i for i, (user, _) in enumerate(queries) if chosen.get(user.id, "prior") == option]
                if rows:
                    out[rows] = sources[option]([queries[i] for i in rows], "answer")
            return out

        return LabelAnswerer(task, distribution_of, biased.group_size)

    @staticmethod
    def _choose(
        task: Task,
        users: Sequence[User],
        sources: dict[str, Callable[[Sequence[Query], Purpose], Distribution]],
    ) -> dict[str, str]:
        val = queries_of(users, "val", task)
        golds = _golds(val)
        predictions = {option: decide(task, source(val, "validate")) for option, source in sources.items()}
        overall = {o: validation_value(task, golds, p) for o, p in predictions.items()} if val else {}
        order = sorted(CHOICES, key=lambda o: -overall.get(o, 0.0))  # stable: equals stay simplest first
        rows_of = _by_user(val)
        chosen = {}
        for user in users:
            rows = rows_of.get(user.id, [])
            if not rows:
                chosen[user.id] = order[0]
                continue
            mine = [golds[i] for i in rows]
            value = {o: validation_value(task, mine, [predictions[o][i] for i in rows]) for o in order}
            chosen[user.id] = max(order, key=value.__getitem__)
        return chosen
