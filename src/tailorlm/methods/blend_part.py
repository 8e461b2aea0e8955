"""The stacked blend as a part a server keeps: what the training answers say about each item, the fitted
blender, and a user's row of the statistics folded in from their own answers.

The item side is fitted once per task on every user's training answers and then frozen:

- ``counts`` ``[items, labels]``: each item's training answers per label, and the global label prior
  (add-one smoothed), from which the user-item prior (``baselines.LabelPrior``) is rebuilt;
- per rating source (ordered labels only), ``baselines.fit_surprise``'s item side as ``collab.ItemFactors``:
  ``biases`` (Surprise's ``BaselineOnly``: the global mean and each item's bias, no factors) and ``mf``
  (``SVD``: each item's bias and factors).

A user's row (``UserRow``) is folded in from their own training answers against that frozen item side, the
same way for a user of the benchmark and a user a server met yesterday: their label counts smoothed
toward the global prior, and per rating source the ridge solution of their bias (and factors) given the
items' (``ItemFactors.fold_in``; for ``biases`` it is Surprise's own ALS step for ``b_u``, with the penalty
chosen on the task adapter's users). Nothing per user is stored: a server folds a user in from the
history it keeps for them, so a user's row follows their history and goes when they are forgotten.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tailorlm import metrics
from tailorlm.data.schema import Example, Task, User
from tailorlm.files import atomic_folder
from tailorlm.methods.baselines import ANSWER_RULES, LabelPrior, answer_rule, fit_surprise, smoothed
from tailorlm.methods.collab import ItemFactors

# The blender's L2 penalty, in units of one answer's loss: small next to the hundreds of rows it is
# fitted on, enough to keep the weights finite when two sources agree on every row.
BLEND_PENALTY = 1.0
MF_FACTORS = 100  # Surprise SVD's default, as the matrix-factorisation baseline uses
# Where a blend's model source comes from: the shared model (the task adapter merged into the base: a
# user needs no module of their own) or the user's own module (collab tokens: their folded-in vector).
MODEL_SOURCES = ("shared", "module")
META_FILE = "blend.json"  # labels, sources, item keys, prior, rating means and penalties, blender, adapter
ITEMS_FILE = "items.safetensors"  # ``counts`` [items, labels], ``{source}.bias`` [items], ``mf.factors``


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


@dataclass(frozen=True)
class UserRow:
    """A user's row of the statistics: their label prior ``[labels]`` (smoothed toward the global one)
    and, per rating source, their folded-in vector ``[factors + 1]`` (bias, then factors)."""

    prior: torch.Tensor
    ratings: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ItemStatistics:
    """The frozen item side of a task's statistics: the labels, the global label ``prior`` ``[labels]``,
    each item's training answers per label, and the rating sources' items (``ItemFactors``)."""

    labels: tuple[str, ...]
    prior: torch.Tensor  # [labels], float64, sums to one
    counts: Mapping[str, torch.Tensor]  # item -> [labels] answers per label
    ratings: Mapping[str, ItemFactors]  # "biases", "mf": ordered labels only

    @classmethod
    def fit(cls, task: Task, tuning: Sequence[User], seed: int = 0) -> ItemStatistics:
        """Every user's training answers of ``task``; the rating sources' fold-in penalties chosen on
        ``tuning``'s validation answers (``ItemFactors.with_penalty``)."""
        found = LabelPrior(task)
        counts = {
            item: torch.tensor([float(Counter(answers)[label]) for label in task.labels], dtype=torch.float64)
            for item, answers in found.by_item.items()
        }
        ratings: dict[str, ItemFactors] = {}
        if task.ordinal:
            from surprise import BaselineOnly

            fitted = fit_surprise(task, BaselineOnly(verbose=False))
            trainset = fitted.trainset
            raw = [trainset.to_raw_iid(inner) for inner in trainset.all_items()]
            biases = ItemFactors(
                float(trainset.global_mean),
                {key: float(fitted.bi[inner]) for inner, key in enumerate(raw)},
                {key: torch.zeros(0, dtype=torch.float64) for key in raw},
                0,
            )
            ratings["biases"] = biases.with_penalty(task, tuning)
            ratings["mf"] = ItemFactors.fit(task, MF_FACTORS, seed).with_penalty(task, tuning)
        prior = torch.tensor(found.prior, dtype=torch.float64)
        return cls(tuple(task.labels), prior, counts, ratings)

    @property
    def sources(self) -> tuple[str, ...]:
        return ("prior", *self.ratings)

    def row(self, examples: Sequence[Example]) -> UserRow:
        """A user's row from their training ``examples``: every answer that is a label counts toward
        their prior; answers to an item fold them in per rating source."""
        labelled = [(e, metrics.label_index(e.targets[0], self.labels)) for e in examples if e.targets]
        counted = Counter(self.labels[i] for _, i in labelled if i >= 0)
        prior = torch.tensor(smoothed(counted, self.labels, self.prior.tolist()), dtype=torch.float64)
        answers = [(e.item_key, float(i)) for e, i in labelled if e.item_key is not None and i >= 0]
        return UserRow(prior, {name: items.fold_in(answers) for name, items in self.ratings.items()})

    def features(self, row: UserRow, item: str | None) -> torch.Tensor:
        """``[sources, labels]``: each source's score of each label for ``row``'s user on ``item`` (None or
        unknown: no item evidence). The prior scores log(user x item / global), normalised; a rating
        source's estimate ``r``, clipped to the labels' positions, scores ``-|position - r|``."""
        zero = torch.zeros(len(self.labels), dtype=torch.float64)
        item_prior = torch.tensor(
            smoothed(Counter(dict(zip(self.labels, self.counts.get(item, zero).tolist(), strict=True))),
                     self.labels, self.prior.tolist()),
            dtype=torch.float64,
        )  # fmt: skip
        product = row.prior * item_prior / self.prior
        found = [torch.log((product / product.sum()).clamp_min(1e-12))]
        positions = torch.arange(len(self.labels), dtype=torch.float64)
        for name, items in self.ratings.items():
            estimate = min(max(items.predict(row.ratings[name], item), 0.0), len(self.labels) - 1.0)
            found.append(-(positions - estimate).abs())
        return torch.stack(found).float()

    @cached_property
    def _most(self) -> float:
        """The most answered item's count of training answers (0 without items)."""
        return max((float(c.sum()) for c in self.counts.values()), default=0.0)

    def warmth(self, item: str | None) -> float:
        """In [0, 1]: the item's count of training answers on a log scale, over the most answered item's."""
        if item not in self.counts or not self._most:
            return 0.0
        return math.log1p(float(self.counts[item].sum())) / math.log1p(self._most)


class BlendPartError(ValueError):
    """A blend part folder that is missing a file or does not hold what a blend part holds."""


@dataclass(frozen=True)
class BlendPart:
    """What a server needs to answer a label request with the blend: the item statistics, the blender,
    how the task answers a distribution (``baselines.answer_rule``), the fingerprint of the task adapter
    whose label distribution the blender's ``model`` source was fitted on, and where that source comes
    from (``model``: one of ``MODEL_SOURCES``; None, with the fingerprint, for a blend without a model)."""

    statistics: ItemStatistics
    blender: Blender
    rule: str
    task_adapter: str | None
    model: str | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        return self.statistics.labels

    @property
    def uses_model(self) -> bool:
        return self.model is not None

    def distribution(self, row: UserRow, item: str | None, model: torch.Tensor | None) -> torch.Tensor:
        """Log-probabilities ``[labels]`` for ``row``'s user on ``item``, from the model's label
        log-probabilities ``model`` ``[labels]`` (needed when the blender has a model source)."""
        features = self.statistics.features(row, item)
        if self.uses_model:
            if model is None:
                raise ValueError("this blend has a model source: give the model's label log-probabilities")
            features = torch.cat([features, model.float()[None]])
        return self.blender.scores(features[None], torch.tensor([self.statistics.warmth(item)]))[0]

    def save(self, folder: Path) -> None:
        """Write the part into ``folder``, replacing it atomically."""
        statistics, keys = self.statistics, sorted(self.statistics.counts)
        tensors = {
            "counts": torch.stack([statistics.counts[k] for k in keys])
            if keys
            else torch.zeros(0, len(self.labels), dtype=torch.float64),
        }
        for name, items in statistics.ratings.items():
            known = sorted(items.factors)
            if known != keys:
                raise BlendPartError(f"the {name} source knows other items than the label counts")
            tensors[f"{name}.bias"] = torch.tensor([items.bias[k] for k in keys], dtype=torch.float64)
            if items.size:
                tensors[f"{name}.factors"] = torch.stack([items.factors[k].double() for k in keys])
        meta = {
            "labels": list(self.labels),
            "items": keys,
            "prior": statistics.prior.tolist(),
            "ratings": {
                name: {"mean": items.mean, "penalty": items.penalty, "factors": items.size}
                for name, items in statistics.ratings.items()
            },
            "blender": {
                "sources": list(self.blender.sources),
                "cold": self.blender.cold.tolist(),
                "warm": self.blender.warm.tolist(),
                "bias": self.blender.bias.tolist(),
            },
            "rule": self.rule,
            "task_adapter": self.task_adapter,
            "model": self.model,
        }
        with atomic_folder(Path(folder)) as staging:
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(staging / ITEMS_FILE))
            (staging / META_FILE).write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> BlendPart:
        """The part in ``folder``; ``BlendPartError`` naming what is wrong with it."""
        folder = Path(folder)
        missing = [n for n in (META_FILE, ITEMS_FILE) if not (folder / n).is_file()]
        if missing:
            raise BlendPartError(
                f"{folder} is not a blend part (a bench run's modules/blend-part-TAG): {', '.join(missing)} "
                "missing"
            )
        try:
            return _read_part(folder)
        except BlendPartError:
            raise
        except Exception as error:  # JSON and safetensors errors of a damaged or foreign folder
            raise BlendPartError(
                f"{folder}: not a readable blend part ({type(error).__name__}: {error})"
            ) from None


def part_for(
    task: Task,
    statistics: ItemStatistics,
    blender: Blender,
    task_adapter: str | None,
    model: str | None = None,
) -> BlendPart:
    """The part of ``task``'s fitted blend; ``model`` (one of ``MODEL_SOURCES``) for a blender with a model
    source, None for one without."""
    if (model is not None) != ("model" in blender.sources) or model not in (None, *MODEL_SOURCES):
        raise ValueError(f"a blender with a model source takes one of {MODEL_SOURCES}, one without None")
    return BlendPart(statistics, blender, answer_rule(task), task_adapter, model)


def _read_part(folder: Path) -> BlendPart:
    """The part in ``folder``, every field checked: a NaN, a label twice or an item key that is not a
    string would answer every request wrongly without a word."""
    path = folder / META_FILE
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or not {"labels", "items", "prior", "ratings", "blender", "rule"} <= set(
        meta
    ):
        raise BlendPartError(f"{path}: not an object with labels, items, prior, ratings, blender and rule")
    labels, keys = meta["labels"], meta["items"]
    for name, values in (("labels", labels), ("items", keys)):
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise BlendPartError(f"{path}: {name} must be a list of non-empty strings")
        if len(set(values)) != len(values):
            raise BlendPartError(f"{path}: a value appears more than once in {name}")
    if len(labels) < 2:
        raise BlendPartError(f"{path}: a blend needs at least two labels, not {len(labels)}")
    if meta["rule"] not in ANSWER_RULES:
        raise BlendPartError(f"{path}: rule must be one of {ANSWER_RULES}, not {meta['rule']!r}")
    if meta.get("task_adapter") is not None and not isinstance(meta["task_adapter"], str):
        raise BlendPartError(f"{path}: task_adapter must be a fingerprint (a string) or null")
    model = meta.get("model")
    prior = _numbers(path, "prior", meta["prior"], len(labels))
    if bool((prior <= 0).any()) or abs(float(prior.sum()) - 1.0) > 1e-6:
        raise BlendPartError(f"{path}: prior must be positive and sum to one")
    blender_meta = meta["blender"]
    if not isinstance(blender_meta, dict):
        raise BlendPartError(f"{path}: blender must be an object")
    sources = blender_meta.get("sources")
    ratings_meta = meta["ratings"]
    if not isinstance(ratings_meta, dict) or set(ratings_meta) - {"biases", "mf"}:
        raise BlendPartError(f"{path}: ratings must be an object of biases and mf")
    known_sources = ["prior", *ratings_meta]
    if sources not in (known_sources, [*known_sources, "model"]):
        raise BlendPartError(f"{path}: blender sources must be {known_sources}, optionally then model")
    if (model is not None) != ("model" in sources) or model not in (None, *MODEL_SOURCES):
        raise BlendPartError(
            f"{path}: model must be one of {MODEL_SOURCES} for a blender with a model source, null without"
        )
    blender = Blender(
        tuple(sources),
        _numbers(path, "blender.cold", blender_meta.get("cold"), len(sources)).float(),
        _numbers(path, "blender.warm", blender_meta.get("warm"), len(sources)).float(),
        _numbers(path, "blender.bias", blender_meta.get("bias"), len(labels)).float(),
    )
    tensors = load_file(str(folder / ITEMS_FILE))
    counts = _table(folder / ITEMS_FILE, tensors, "counts", (len(keys), len(labels)))
    if bool((counts < 0).any()):
        raise BlendPartError(f"{folder / ITEMS_FILE}: counts must not be negative")
    ratings, expected = {}, {"counts"}
    for name, fields in ratings_meta.items():
        if not isinstance(fields, dict):
            raise BlendPartError(f"{path}: ratings.{name} must be an object")
        size = fields.get("factors")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 1024:
            raise BlendPartError(f"{path}: ratings.{name}.factors must be a whole number 0..1024")
        mean, penalty = (
            _numbers(path, f"ratings.{name}.{f}", [fields.get(f)], 1) for f in ("mean", "penalty")
        )
        if float(penalty) <= 0:  # the ridge keeps a user with fewer answers than factors solvable
            raise BlendPartError(f"{path}: ratings.{name}.penalty must be above 0")
        bias = _table(folder / ITEMS_FILE, tensors, f"{name}.bias", (len(keys),))
        expected.add(f"{name}.bias")
        if size:
            factors = _table(folder / ITEMS_FILE, tensors, f"{name}.factors", (len(keys), size))
            expected.add(f"{name}.factors")
        else:
            factors = torch.zeros(len(keys), 0, dtype=torch.float64)
        ratings[name] = ItemFactors(
            float(mean),
            {k: float(b) for k, b in zip(keys, bias.tolist(), strict=True)},
            {k: factors[i].double() for i, k in enumerate(keys)},
            size,
            float(penalty),
        )
    if set(tensors) != expected:
        raise BlendPartError(
            f"{folder / ITEMS_FILE}: holds {sorted(tensors)}, this part needs {sorted(expected)}"
        )
    statistics = ItemStatistics(
        tuple(labels), prior, {k: counts[i].double() for i, k in enumerate(keys)}, ratings
    )
    return BlendPart(statistics, blender, meta["rule"], meta.get("task_adapter"), model)


def _numbers(path: Path, name: str, values: object, size: int) -> torch.Tensor:
    """``values`` as float64 ``[size]``: a list of finite numbers (JSON's booleans are not numbers)."""
    if (
        not isinstance(values, list)
        or len(values) != size
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )
    ):
        raise BlendPartError(f"{path}: {name} must be {size} finite numbers")
    return torch.tensor(values, dtype=torch.float64)


def _table(
    path: Path, tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """``tensors[name]``: floating point, of ``shape``, finite."""
    tensor = tensors.get(name)
    if tensor is None or not tensor.is_floating_point() or tuple(tensor.shape) != shape:
        raise BlendPartError(f"{path}: {name} must be floating point of shape {shape}")
    if not bool(torch.isfinite(tensor).all()):
        raise BlendPartError(f"{path}: {name} must hold finite numbers")
    return tensor.double()
