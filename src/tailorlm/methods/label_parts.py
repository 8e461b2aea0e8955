"""A user's label part: a few numbers per user over a task's labels, fitted on the user's own items
against a frozen shared model and stored as one ``label-bias`` module (``kinds.label_bias``): a bias
shrunk toward zero, the user's label prior fused with the shared model, the prior alone, or per user the
best of these on their own validation items. Also the pieces the label methods share: the shared model's
label distributions, the prior's, their fusion, and settings tuned on validation items.

Every distribution here is a ``[rows, labels]`` tensor of log-probabilities over ``task.labels``. Whatever
is tuned (the bias's shrinkage, the fusion weight, a user's option) is chosen on validation items, never on
a test item; the prompts that fit or tune anything are traced like every other method's, so the leakage
test holds them to the same rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from tailorlm import metrics
from tailorlm.data.schema import Example, Task, User
from tailorlm.engine.engine import Engine
from tailorlm.kinds.label_bias import label_part
from tailorlm.methods.baselines import LabelPrior, suited_label
from tailorlm.methods.deps import MethodDeps
from tailorlm.methods.recipes import PromptBuilder, Purpose, Recipe
from tailorlm.methods.setups import Answerer, Query, prompts_for
from tailorlm.progress import ProgressCallback
from tailorlm.store.index import VersionRecord
from tailorlm.store.module_folder import NonFiniteModuleError
from tailorlm.store.store import ModuleStore
from tailorlm.train.joint import fit_bias

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


def has_label(task: Task, example: Example) -> bool:
    """Whether ``example``'s target is one of ``task.labels``."""
    return bool(example.targets) and metrics.label_index(example.targets[0], task.labels) >= 0


def labelled(task: Task, examples: Sequence[Example]) -> list[Example]:
    """The examples whose target is one of ``task.labels``."""
    return [e for e in examples if has_label(task, e)]


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
    rows_of = rows_by_user(queries)
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
                scores = answerer.engine.score_labels(prompts, [slot_of.get(user.id, 0)] * len(rows), labels)
                out[rows] = torch.log_softmax(torch.tensor(scores, dtype=torch.float32), dim=-1)
                done += 1
                if on_progress is not None:
                    on_progress(done, len(users))
    return out


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


def queries_of(users: Sequence[User], split: str, task: Task) -> list[Query]:
    """Every (user, example) of ``split`` (``train``: what a module may train on) with a known label."""
    found: list[Query] = []
    for user in users:
        examples = task.training_examples(user) if split == "train" else getattr(user, split)
        found += [(user, e) for e in labelled(task, examples)]
    return found


def golds_of(queries: Sequence[Query]) -> list[str]:
    """Each query's gold label."""
    return [example.targets[0] for _, example in queries]


def rows_by_user(queries: Sequence[Query]) -> dict[str, list[int]]:
    """The rows of ``queries`` of each user."""
    rows: dict[str, list[int]] = {}
    for i, (user, _) in enumerate(queries):
        rows.setdefault(user.id, []).append(i)
    return rows


Part = tuple[torch.Tensor, float]  # one user's (bias [labels], weight): ``kinds.label_bias``'s two tensors


@dataclass
class UserParts:
    """Each user's label part against one shared model: ``(bias [labels], weight)``, the user's scores
    being ``weight * log p_shared + bias`` (``kinds.label_bias``), with the option each answers by."""

    parts: dict[str, Part]
    options: dict[str, str]  # user -> one of ``OPTIONS``: "prior", "bias" or "fusion"
    shrinkage: float | None = None  # the biases' penalty, when a bias was fitted
    weight: float | None = None  # the fusion's weight on the shared model, when one was chosen

    def apply(self, distribution: Distribution, queries: Sequence[Query]) -> Distribution:
        if not queries:
            return distribution
        bias = torch.stack([self.parts[user.id][0] for user, _ in queries])
        weight = torch.tensor([[self.parts[user.id][1]] for user, _ in queries])
        return torch.log_softmax(weight * distribution + bias, dim=-1)


# What a user may be answered by, simplest first (ties go this way): their own label prior alone, their
# bias against the shared model, the shared model fused with their prior, or their own module.
OPTIONS = ("prior", "bias", "fusion", "module")
# How a user's served label part is fitted (``fit_user_parts``): as one option for every user, or
# "select": per user, the option of "prior", "bias" and "fusion" best on their own validation items.
FITS = ("bias", "fusion", "select")
FORMER_FITS = {"choice": "select"}  # earlier names, which a store's settings may still hold


def fit_user_parts(
    task: Task,
    shared: Answerer,
    users: Sequence[User],
    fit: str = "bias",
    shrinkage: float | None = None,
    weight: float | None = None,
) -> UserParts:
    """Fit every user's label part against the frozen ``shared`` model (rows in slot 0), from their own
    training items only. A bias's ``shrinkage`` and a fusion's ``weight``, when not given, are chosen on
    these users' validation items (pooled), from ``SHRINKAGE_GRID`` and ``FUSION_WEIGHTS``; with ``fit``
    "select" each user then takes whichever of their prior, their bias and the fusion did best on their
    own validation items. The prior is the user's own training labels' frequencies smoothed toward every
    user's (``LabelPrior.user``): a served request names no item, so no item prior enters."""
    if fit not in FITS:
        raise ValueError(f"a label part is fitted as one of {', '.join(FITS)}, not {fit!r}")
    val = queries_of(users, "val", task)
    golds = golds_of(val)
    val_dist = None
    if val and (
        fit == "select" or (fit == "bias" and shrinkage is None) or (fit == "fusion" and weight is None)
    ):
        val_dist = shared_distribution(shared, val, "validate")

    def predict(parts: dict[str, Part]) -> list[str]:
        return decide(task, UserParts(parts, {}).apply(val_dist, val))

    candidates: dict[str, dict[str, Part]] = {}
    if fit in ("fusion", "select"):
        prior = LabelPrior(task)
        log_prior = {u.id: torch.log(torch.tensor(prior.user(u), dtype=torch.float32)) for u in users}
        candidates["prior"] = {u.id: (log_prior[u.id], 0.0) for u in users}
    if fit in ("bias", "select"):
        biases = _bias_fitter(task, shared, users)
        if shrinkage is None:  # best_setting takes the first, safest, value when there are no golds
            shrinkage, _ = best_setting(task, SHRINKAGE_GRID, golds, lambda s: predict(biases(s)))
        candidates["bias"] = biases(shrinkage)
    if fit in ("fusion", "select"):
        if weight is None:
            weight, _ = best_setting(
                task, FUSION_WEIGHTS, golds, lambda value: predict(_fused(log_prior, value))
            )
        candidates["fusion"] = _fused(log_prior, weight)
    if fit == "select":
        predictions = {option: predict(parts) if val else [] for option, parts in candidates.items()}
        options = select_per_user(task, users, val, predictions)
    else:
        options = {u.id: fit for u in users}
    parts = {u.id: candidates[options[u.id]][u.id] for u in users}
    return UserParts(parts, options, shrinkage, weight)


def _fused(log_prior: Mapping[str, torch.Tensor], weight: float) -> dict[str, Part]:
    """``fuse`` as a label part: weight ``weight``, bias ``(1 - weight)`` times the log prior (the shared
    model's log-normaliser is one constant per row, which a softmax ignores)."""
    return {user: ((1 - weight) * logs, weight) for user, logs in log_prior.items()}


def _bias_fitter(task: Task, shared: Answerer, users: Sequence[User]) -> Callable[[float], dict[str, Part]]:
    """Every user's bias on their own training items at a given shrinkage (weight 1), remembered per
    shrinkage; the training items are scored against ``shared`` once, here."""
    train = queries_of(users, "train", task)
    progress = shared.deps.reporter.progress(f"{shared.method}: scoring training items")
    train_dist = shared_distribution(shared, train, "train", progress)
    train_rows = rows_by_user(train)
    targets = {
        u: [metrics.label_index(train[i][1].targets[0], task.labels) for i in rows]
        for u, rows in train_rows.items()
    }
    fits: dict[float, dict[str, Part]] = {}

    def fitted(strength: float) -> dict[str, Part]:
        if strength not in fits:
            fits[strength] = {
                user.id: (
                    fit_bias(train_dist[train_rows.get(user.id, [])], targets.get(user.id, []), strength),
                    1.0,
                )
                for user in users
            }
        return fits[strength]

    return fitted


# The fewest validation items on which a user's own option is selected. Below it, one item moves a user's
# accuracy by more than 0.1, more than the options differ by over all users (docs/benchmark-results.md:
# gaps of 0.02-0.05), so a selection on so few items is mostly noise (measured: with 2 items each, the
# users moved off the prior gained nothing); such a user gets the option best over all users.
MIN_SELECT_ITEMS = 10


def select_per_user(
    task: Task,
    users: Sequence[User],
    val: Sequence[Query],
    predictions: Mapping[str, Sequence[str]],
    min_items: int = MIN_SELECT_ITEMS,
) -> dict[str, str]:
    """Each user's option (a key of ``predictions``, in the order of ``OPTIONS``): the one whose predictions
    on ``val`` score best on the user's own validation items, when they have at least ``min_items`` of
    them. Ties, and users with fewer, go to the option best over every user's items, and between equals to
    the simpler."""
    golds = golds_of(val)
    overall = {o: validation_value(task, golds, p) for o, p in predictions.items()} if val else {}
    order = sorted(predictions, key=lambda o: -overall.get(o, 0.0))  # stable: equals stay simplest first
    rows_of = rows_by_user(val)
    chosen = {}
    for user in users:
        rows = rows_of.get(user.id, [])
        if len(rows) < max(1, min_items):
            chosen[user.id] = order[0]
            continue
        mine = [golds[i] for i in rows]
        value = {o: validation_value(task, mine, [predictions[o][i] for i in rows]) for o in order}
        chosen[user.id] = max(order, key=value.__getitem__)
    return chosen


SHRINKAGE_KEY = "label-bias-shrinkage"  # the store index's record of the shrinkage its biases use
WEIGHT_KEY = "label-fusion-weight"  # and of the weight its fusions give the shared model


def fit_and_store(
    deps: MethodDeps,
    engine: Engine,
    store: ModuleStore,
    users: Sequence[User],
    method: str,
    builder: PromptBuilder | None = None,
    fingerprints: Mapping[str, str] | None = None,
    fit: str = "bias",
) -> dict[str, VersionRecord]:
    """Fit ``users``' label parts (``fit_user_parts``) against ``engine``'s shared model (slot 0) and store
    each as a new version of their module (``engine.spec``, a label-bias spec); a part that came out with
    a NaN or an inf is not stored (the user keeps their previous version), the others are. A shrinkage or
    fusion weight is chosen on these users' validation items the first time and kept in the store's
    index, so users fitted later (a resumed run, a retrain of one user) get the same one."""
    stored_before = bool(store.users())
    known = {key: store.index.meta(key) if stored_before else None for key in (SHRINKAGE_KEY, WEIGHT_KEY)}
    builder = builder or deps.builder(Recipe(), engine.tokenizer)
    shared = Answerer(deps, method, engine, builder, deps.settings.answer_group)  # every row in slot 0
    fitted = fit_user_parts(
        deps.task,
        shared,
        users,
        fit,
        None if known[SHRINKAGE_KEY] is None else float(known[SHRINKAGE_KEY]),
        None if known[WEIGHT_KEY] is None else float(known[WEIGHT_KEY]),
    )
    for key, value in ((SHRINKAGE_KEY, fitted.shrinkage), (WEIGHT_KEY, fitted.weight)):
        if value is not None:
            store.index.set_meta(key, repr(value))
    records = {}
    for user in users:
        bias, weight = fitted.parts[user.id]
        meta = {
            "fit": fit,
            "option": fitted.options[user.id],
            "shrinkage": fitted.shrinkage,
            "weight": fitted.weight,
            "examples": len(deps.task.training_examples(user)),
        }
        try:
            records[user.id] = store.put(
                user.id,
                engine.spec,
                label_part(bias, weight),
                model=engine.model,
                base_name=engine.base.name,
                meta=meta,
                data_fingerprint=(fingerprints or {}).get(user.id),
            )
        except NonFiniteModuleError:  # not stored, as no diverged module is; the other users are
            continue
    counts = {o: sum(1 for x in fitted.options.values() if x == o) for o in OPTIONS}
    settings = [
        f"{name} {value:g}" + (" (the store's)" if known[key] is not None else "")
        for name, key, value in (
            ("shrinkage", SHRINKAGE_KEY, fitted.shrinkage),
            ("weight", WEIGHT_KEY, fitted.weight),
        )
        if value is not None
    ]
    answered = ", ".join(f"{o} {n}" for o, n in counts.items() if n)
    deps.reporter.log(
        f"{method}: {len(users)} users' label parts fitted as {fit} ({answered}; {', '.join(settings)})"
    )
    return records
