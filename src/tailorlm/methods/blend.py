"""A stacked blend: what a statistician knows and what the shared model reads, weighed per item by how
much the statistics know about it.

Where the test items were answered by many training users, matrix factorisation and the user-item prior
beat every model method; where items are new, the model wins (docs/benchmark-results.md). Stacking
(Wolpert, 1992; the Netflix Prize blends, Töscher et al., 2009) learns that trade-off from held-out
answers instead of picking one side. Each source gives a score per label:

- ``prior``: the log of the user's and the item's label priors combined (``baselines.LabelPrior``);
- ``biases`` and ``mf`` (ordered labels only): Surprise's damped biases and biased matrix factorisation,
  their estimate ``r`` (a label position) scored per label as ``-|position - r|``: a Laplace shape, whose
  median is ``r``, as suits the rating tasks' MAE (a squared distance, a Gaussian's, blended worse on
  bfi and movielens: 0.859 and 0.829 MAE against 0.832 and 0.805);
- ``model``: the shared model's (the task adapter's) log-probability of the label.

A label's blended score for a query is ``sum_k (a_k + b_k * warmth) * score_k(label) + c_label``, softmaxed
over the labels, with ``warmth`` in [0, 1] the item's count of training answers, ``log1p(n) / log1p(max
n)``: each source's weight moves from ``a_k`` on an item nobody answered to ``a_k + b_k`` on the most
answered one. The ``2K + labels`` numbers are one per task, fitted by L-BFGS (cross-entropy plus a small L2
penalty) on validation answers: the sources read only training answers, so a validation answer is
out-of-fold for every statistic, as it is for the model (the task adapter picks its epoch on some of
them, the only use it makes of any). The rows are the task adapter's users' validation answers and the
test users' own. An item nobody answered in training has warmth 0, an item prior equal to
the global one and Surprise's global estimates, so the model's weight decides it.

``blend-stats`` is the same blend without the model: a simple baseline, the strongest one when it wins,
and the reference the model's part has to beat. A user's personal part is their own row of the
statistics (their label counts, their bias and factors): nothing is trained per user.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tailorlm import metrics
from tailorlm.data.schema import Task, User
from tailorlm.methods.baselines import LabelPrior, fit_surprise
from tailorlm.methods.deps import MethodDeps
from tailorlm.methods.label_models import LabelAnswerer
from tailorlm.methods.label_parts import Distribution, queries_of, shared_distribution
from tailorlm.methods.recipes import Purpose, Recipe
from tailorlm.methods.setups import Answerer, Query, TaskAdapterSetup

# The blender's L2 penalty, in units of one answer's loss: small next to the hundreds of rows it is
# fitted on, enough to keep the weights finite when two sources agree on every row.
BLEND_PENALTY = 1.0


@dataclass(frozen=True)
class Blender:
    """The fitted blend: per source ``cold`` (``a``) and ``warm`` (``b``) weights, and ``bias`` (``c``)
    ``[labels]``."""

    sources: tuple[str, ...]
    cold: torch.Tensor  # [sources]
    warm: torch.Tensor  # [sources]
    bias: torch.Tensor  # [labels]

    def scores(self, features: torch.Tensor, warmth: torch.Tensor) -> torch.Tensor:
        """``features`` ``[rows, sources, labels]`` and ``warmth`` ``[rows]`` -> log-probabilities
        ``[rows, labels]``."""
        weights = self.cold[None] + self.warm[None] * warmth[:, None]  # [rows, sources]
        return torch.log_softmax((weights[:, :, None] * features).sum(1) + self.bias, dim=-1)

    def describe(self) -> str:
        parts = [
            f"{name} {float(a):+.2f}{float(b):+.2f}w"
            for name, a, b in zip(self.sources, self.cold, self.warm, strict=True)
        ]
        return ", ".join(parts)


def fit_blender(
    sources: Sequence[str],
    features: torch.Tensor,
    warmth: torch.Tensor,
    targets: Sequence[int],
    penalty: float = BLEND_PENALTY,
) -> Blender:
    """The blender minimising the summed cross-entropy of ``targets`` (label indices) plus ``penalty / 2``
    times the squared norm of every weight; ``features`` ``[rows, sources, labels]``, ``warmth``
    ``[rows]``. A convex problem (the scores are linear in the weights), solved by L-BFGS in float64.
    Without rows every weight is 0: each label equally likely."""
    count, labels = len(sources), features.shape[2]
    params = torch.zeros(2 * count + labels, dtype=torch.float64, requires_grad=True)
    if len(targets):
        x, w = features.double(), warmth.double()
        wanted = torch.tensor(list(targets))
        optimizer = torch.optim.LBFGS(
            [params], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )  # fmt: skip

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            cold, warm, bias = params[:count], params[count : 2 * count], params[2 * count :]
            weights = cold[None] + warm[None] * w[:, None]
            logits = (weights[:, :, None] * x).sum(1) + bias
            loss = torch.nn.functional.cross_entropy(logits, wanted, reduction="sum")
            loss = loss + penalty / 2 * params.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(objective)
    found = params.detach().float()
    return Blender(tuple(sources), found[:count], found[count : 2 * count], found[2 * count :])


class ModelSetup(Protocol):
    """A setup whose answerer scores the labels with a model: the blend's model source."""

    def answerer(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> Answerer: ...


class Statistics:
    """The statistical sources of a task, fitted once on every user's training answers."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.prior = LabelPrior(task)
        counts = [len(answers) for answers in self.prior.by_item.values()]
        self._most = math.log1p(max(counts, default=0))
        self.estimators: dict[str, object] = {}
        if task.ordinal:
            from surprise import SVD, BaselineOnly

            self.estimators = {
                "biases": fit_surprise(task, BaselineOnly(verbose=False)),
                "mf": fit_surprise(task, SVD(random_state=0)),
            }

    @property
    def names(self) -> tuple[str, ...]:
        return ("prior", *self.estimators)

    def scores(self, queries: Sequence[Query]) -> torch.Tensor:
        """``[rows, sources, labels]``: each statistic's score of each label."""
        positions = torch.arange(len(self.task.labels), dtype=torch.float32)
        prior = torch.tensor([self.prior.distribution(u, e) for u, e in queries], dtype=torch.float32)
        found = [torch.log(prior.clamp_min(1e-12))]
        for estimator in self.estimators.values():
            estimates = torch.tensor([estimator.predict(u.id, e.item_key).est for u, e in queries])
            found.append(-(positions[None] - estimates[:, None].float()).abs())
        return torch.stack(found, dim=1)

    def warmth(self, queries: Sequence[Query]) -> torch.Tensor:
        """``[rows]`` in [0, 1]: how many training answers each query's item has, on a log scale."""
        if not self._most:
            return torch.zeros(len(queries))
        return torch.tensor(
            [math.log1p(len(self.prior.by_item.get(e.item_key, ()))) / self._most for _, e in queries]
        )


class BlendSetup:
    """The stacked blend of the statistics and a model's label distribution: ``model`` is the setup whose
    ``answerer`` gives the ``model`` source (default: the task adapter; None: the statistics alone)."""

    def __init__(self, model: ModelSetup | None = None, with_model: bool = True) -> None:
        self.model = (model or TaskAdapterSetup()) if with_model else None

    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> LabelAnswerer:
        task = deps.task
        statistics = Statistics(task)
        shared = self.model.answerer(deps, method, recipe, users) if self.model is not None else None
        names = (*statistics.names, *(("model",) if shared else ()))

        def features(queries: Sequence[Query], purpose: Purpose) -> torch.Tensor:
            found = statistics.scores(queries)
            if shared is not None:
                found = torch.cat([found, shared_distribution(shared, queries, purpose)[:, None]], dim=1)
            return found

        # The task adapter's users' validation answers and the test users' own: the same rows with the
        # model or without, so the two blends differ by the model's part alone.
        rows = queries_of(deps.adapter_users, "val", task) + queries_of(users, "val", task)
        targets = [metrics.label_index(e.targets[0], task.labels) for _, e in rows]
        blender = fit_blender(names, features(rows, "validate"), statistics.warmth(rows), targets)
        deps.reporter.log(f"{method}: blended on {len(rows)} validation answers: {blender.describe()}")

        def distribution_of(queries: Sequence[Query]) -> Distribution:
            return blender.scores(features(queries, "answer"), statistics.warmth(queries))

        group_size = shared.group_size if shared else deps.settings.answer_group
        return LabelAnswerer(task, distribution_of, group_size)
