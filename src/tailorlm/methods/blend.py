"""A stacked blend: what a statistician knows and what the shared model reads, weighed per item by how
much the statistics know about it.

Where the test items were answered by many training users, matrix factorisation and the user-item prior
beat every model method; where items are new, the model wins (docs/benchmark-results.md). Stacking
(Wolpert, 1992; the Netflix Prize blends, Töscher et al., 2009) learns that trade-off from held-out
answers instead of picking one side. Each source gives a score per label:

- ``prior``: the log of the user's and the item's label priors combined (as ``baselines.LabelPrior``);
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
statistics (their label counts, their bias and factors), folded in from their training answers against
the frozen items (``blend_part``): nothing is trained per user, and a server folds in a user it has never
seen the same way. The run keeps the fitted part (``modules/METHOD-part-TAG``), which ``users import
--blend`` gives a users store so its server answers label requests that name an item with the blend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tailorlm import metrics
from tailorlm.data.schema import User
from tailorlm.methods.blend_part import ItemStatistics, UserRow, fit_blender, part_for
from tailorlm.methods.collab import tensors_fingerprint
from tailorlm.methods.deps import MethodDeps
from tailorlm.methods.label_models import LabelAnswerer
from tailorlm.methods.label_parts import Distribution, queries_of, shared_distribution
from tailorlm.methods.recipes import Purpose, Recipe
from tailorlm.methods.setups import Answerer, Query, TaskAdapterSetup

PART_FOLDER = "{method}-part-{tag}"  # the fitted part, in the run's modules folder


class ModelSetup(Protocol):
    """A setup whose answerer scores the labels with a model: the blend's model source."""

    def answerer(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> Answerer: ...


class Rows:
    """Each user's row of ``statistics``, folded in once from their training answers."""

    def __init__(self, deps: MethodDeps, statistics: ItemStatistics) -> None:
        self.deps, self.statistics = deps, statistics
        self._rows: dict[str, UserRow] = {}

    def features(self, queries: Sequence[Query]) -> torch.Tensor:
        """``[rows, sources, labels]``: each statistic's score of each label."""
        found = []
        for user, example in queries:
            if user.id not in self._rows:
                self._rows[user.id] = self.statistics.row(self.deps.task.training_examples(user))
            found.append(self.statistics.features(self._rows[user.id], example.item_key))
        if not found:
            return torch.zeros(0, len(self.statistics.sources), len(self.statistics.labels))
        return torch.stack(found)

    def warmth(self, queries: Sequence[Query]) -> torch.Tensor:
        """``[rows]`` in [0, 1]: how many training answers each query's item has, on a log scale."""
        return torch.tensor([self.statistics.warmth(e.item_key) for _, e in queries], dtype=torch.float32)


class BlendSetup:
    """The stacked blend of the statistics and a model's label distribution: ``model`` is the setup whose
    ``answerer`` gives the ``model`` source (default: the task adapter; None: the statistics alone), and
    ``model_from`` says whether a server asks it of the shared model or of each user's own module
    (``blend_part.MODEL_SOURCES``)."""

    def __init__(
        self, model: ModelSetup | None = None, with_model: bool = True, model_from: str = "shared"
    ) -> None:
        self.model = (model or TaskAdapterSetup()) if with_model else None
        self.model_from = model_from if with_model else None

    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> LabelAnswerer:
        task = deps.task
        statistics = ItemStatistics.fit(task, deps.adapter_users, deps.settings.seed)
        rows_of = Rows(deps, statistics)
        shared = self.model.answerer(deps, method, recipe, users) if self.model is not None else None
        names = (*statistics.sources, *(("model",) if shared else ()))

        def features(queries: Sequence[Query], purpose: Purpose) -> torch.Tensor:
            found = rows_of.features(queries)
            if shared is not None:
                found = torch.cat([found, shared_distribution(shared, queries, purpose)[:, None]], dim=1)
            return found

        # The task adapter's users' validation answers and the test users' own: the same rows with the
        # model or without, so the two blends differ by the model's part alone.
        rows = queries_of(deps.adapter_users, "val", task) + queries_of(users, "val", task)
        targets = [metrics.label_index(e.targets[0], task.labels) for _, e in rows]
        blender = fit_blender(names, features(rows, "validate"), rows_of.warmth(rows), targets)
        deps.reporter.log(f"{method}: blended on {len(rows)} validation answers: {blender.describe()}")
        adapter = None
        if shared is not None:
            adapter = tensors_fingerprint(
                TaskAdapterSetup().ensure_trained(deps, recipe).get(TaskAdapterSetup.USER).tensors
            )
        part_for(task, statistics, blender, adapter, self.model_from).save(
            deps.modules / PART_FOLDER.format(method=method, tag=recipe.tag)
        )

        def distribution_of(queries: Sequence[Query]) -> Distribution:
            return blender.scores(features(queries, "answer"), rows_of.warmth(queries))

        group_size = shared.group_size if shared else deps.settings.answer_group
        return LabelAnswerer(task, distribution_of, group_size)
