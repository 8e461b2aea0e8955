"""Metrics exactly as the reference systems score them, pooled and per user, with bootstrap statistics.

Rules reproduced (hand-computed cases in ``tests/data/test_data_metrics.py``):

- ``accuracy`` / ``f1`` (LaMP-1, LaMP-2): output and gold are stripped; an output that is not exactly a
  label maps to index -1 and is wrong; macro-F1 is over the real labels only (a label nobody predicted
  and nobody has scores 0), so -1 is never a class of its own.
- ``mae`` / ``rmse`` (LaMP-3): an output that does not parse as a number counts as the worst case, the end
  of the scale farther from the gold (1 or 5; a gold in the middle gets 5, as LaMP's ``>`` test does).
  Ratings with text labels (a Likert scale, "very inaccurate" ... "very accurate") count as their
  position in the listed order, from 1 (``rating_values``); an output that is not one of them is the
  worst case on that 1..K scale.
- ``rouge1`` / ``rougeL``: F-measure from ``rouge-score``; LaMP's script calls HF ``evaluate``'s rouge,
  which uses no stemmer by default, so neither do we unless ``stemmer=True``.
- ``lenient_accuracy`` (PEFT-U): the output is split on commas, each piece stripped, one trailing ".",
  "'", "ing" and "ed" removed in turn, and mapped to the first label it is a substring of; pieces that are
  then no label are dropped; the example is correct if any remaining piece is one of the gold labels.

Every metric is reported pooled over examples and as the mean of per-user values (PEFT-U's task score is
the per-user mean of accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from statistics import NormalDist
from typing import Any

import numpy as np

KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1"),
    "multilabel": ("lenient_accuracy",),
    "rating": ("mae", "rmse"),
    "generation": ("rouge1", "rougeL"),
}
ALL_METRICS: tuple[str, ...] = ("accuracy", "f1", "lenient_accuracy", "mae", "rmse", "rouge1", "rougeL")
LOWER_IS_BETTER: frozenset[str] = frozenset({"mae", "rmse"})
LAMP_SCALE: tuple[float, float] = (1.0, 5.0)
_LENIENT_SUFFIXES: tuple[str, ...] = (".", "'", "ing", "ed")
_CHUNK_CELLS = 4_000_000  # resample rows x users per numpy batch: keeps 15k users x 10k resamples in memory

Gold = str | Sequence[str]


# --- single rules ----------------------------------------------------------------------------------------


def label_index(text: str, labels: Sequence[str]) -> int:
    """LaMP's mapping: the stripped text's position among the labels, -1 when it is not exactly one."""
    stripped = str(text).strip()
    try:
        return list(labels).index(stripped)
    except ValueError:
        return -1


def accuracy(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> float:
    """Share of examples whose mapped output equals the mapped gold (LaMP compares indices, -1 included)."""
    pairs = [(label_index(g, labels), label_index(p, labels)) for g, p in zip(golds, preds, strict=True)]
    return sum(g == p for g, p in pairs) / len(pairs)


def macro_f1(
    golds: Sequence[str], preds: Sequence[str], labels: Sequence[str], only: Iterable[int] | None = None
) -> float:
    """Macro-F1 over the real labels (``only`` restricts to some label indices); a label with no true and no
    predicted example scores 0, as scikit-learn's ``f1_score(labels=..., average="macro")`` does."""
    gold_idx = [label_index(g, labels) for g in golds]
    pred_idx = [label_index(p, labels) for p in preds]
    scores = []
    for label in range(len(labels)) if only is None else sorted(only):
        tp = sum(g == label and p == label for g, p in zip(gold_idx, pred_idx, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold_idx, pred_idx, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold_idx, pred_idx, strict=True))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def rating_values(labels: Sequence[str]) -> dict[str, float] | None:
    """What each rating label counts as in MAE and RMSE when the labels are text: its 1-based position in
    the order listed ("very inaccurate" 1 ... "very accurate" 5). None when every label is a number: then
    an output is read as the number it spells (LaMP's rule, so "3.5" counts as 3.5)."""
    if _numeric(labels):
        return None
    return {label: float(position) for position, label in enumerate(labels, start=1)}


def _gold_number(gold: str, values: Mapping[str, float] | None) -> float:
    text = str(gold).strip()
    if values is not None:
        if text not in values:
            raise ValueError(f"the gold rating {text!r} is not one of the rating labels {list(values)}")
        return values[text]
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"the gold rating {text!r} is not a number; ratings with text labels are scored by their "
            "position, which needs the labels in order"
        ) from None


def rating_value(
    pred: str, gold: str, scale: tuple[float, float] = LAMP_SCALE, values: Mapping[str, float] | None = None
) -> float:
    """The number an output counts as: itself if it parses (or, with text labels' ``values``, its label's
    position), else the worst case for this gold.

    LaMP's rule: ``1.0 if abs(1 - gold) > abs(5 - gold) else 5.0``. One deliberate difference: "nan" and
    "inf" parse as floats in Python and would turn the whole MAE into nan; they count as not a number.
    """
    low, high = scale
    text = str(pred).strip()
    if values is not None:
        if text in values:
            return values[text]
    else:
        try:
            value = float(text)
            if math.isfinite(value):
                return value
        except ValueError:
            pass
    truth = _gold_number(gold, values)
    return low if abs(low - truth) > abs(high - truth) else high


def _rating_errors(
    golds: Sequence[str],
    preds: Sequence[str],
    scale: tuple[float, float],
    values: Mapping[str, float] | None = None,
) -> list[float]:
    return [
        rating_value(p, g, scale, values) - _gold_number(g, values) for g, p in zip(golds, preds, strict=True)
    ]


def mae(
    golds: Sequence[str],
    preds: Sequence[str],
    scale: tuple[float, float] = LAMP_SCALE,
    values: Mapping[str, float] | None = None,
) -> float:
    errors = _rating_errors(golds, preds, scale, values)
    return sum(abs(e) for e in errors) / len(errors)


def rmse(
    golds: Sequence[str],
    preds: Sequence[str],
    scale: tuple[float, float] = LAMP_SCALE,
    values: Mapping[str, float] | None = None,
) -> float:
    errors = _rating_errors(golds, preds, scale, values)
    return math.sqrt(sum(e * e for e in errors) / len(errors))


@cache
def _rouge_scorer(stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=stemmer)


def rouge_per_example(
    golds: Sequence[str], preds: Sequence[str], stemmer: bool = False
) -> dict[str, list[float]]:
    """ROUGE-1 and ROUGE-L F-measure of each (stripped) output against its (stripped) gold."""
    scorer = _rouge_scorer(stemmer)
    values: dict[str, list[float]] = {"rouge1": [], "rougeL": []}
    for gold, pred in zip(golds, preds, strict=True):
        scores = scorer.score(str(gold).strip(), str(pred).strip())
        values["rouge1"].append(scores["rouge1"].fmeasure)
        values["rougeL"].append(scores["rougeL"].fmeasure)
    return values


def lenient_label(piece: str, labels: Sequence[str]) -> str:
    """PEFT-U's lenient reading of one output piece: strip, drop one trailing ".", "'", "ing", "ed" in
    turn, then the first label that contains it. One deliberate difference: an empty piece stays empty
    (in PEFT-U the empty string is a substring of every label, so an empty output scored as the first)."""
    text = piece.strip()
    for suffix in _LENIENT_SUFFIXES:
        text = text.removesuffix(suffix)
    if not text:
        return text
    return next((label for label in labels if text in label), text)


def gold_labels(gold: Gold) -> tuple[str, ...]:
    """A gold as its labels: a tuple as is, a string split on ", " as PEFT-U joins multi-label targets."""
    return tuple(gold) if not isinstance(gold, str) else tuple(gold.split(", "))


def lenient_correct(gold: Gold, output: str, labels: Sequence[str]) -> bool:
    """PEFT-U: correct if any output piece, read leniently, is one of the gold labels."""
    pieces = [lenient_label(piece, labels) for piece in str(output).split(",")]
    truth = gold_labels(gold)
    return any(piece in labels and piece in truth for piece in pieces)


def lenient_accuracy(golds: Sequence[Gold], preds: Sequence[str], labels: Sequence[str]) -> float:
    return sum(lenient_correct(g, p, labels) for g, p in zip(golds, preds, strict=True)) / len(golds)


# --- pooled and per user -----------------------------------------------------------------------------------


def _as_text(gold: Gold) -> str:
    return gold if isinstance(gold, str) else ", ".join(gold)


def _metric_names(task_kind_or_metrics: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(task_kind_or_metrics, str):
        if task_kind_or_metrics in KIND_METRICS:
            return KIND_METRICS[task_kind_or_metrics]
        names: tuple[str, ...] = (task_kind_or_metrics,)
    else:
        names = tuple(task_kind_or_metrics)
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(ALL_METRICS)} or a task kind")
    return names


@dataclass(frozen=True)
class RatingScale:
    """How a task's ratings are read: the scale's ends (where the worst case lies) and, for text labels,
    each label's position (``rating_values``); ``values`` None reads outputs as numbers."""

    ends: tuple[float, float] = LAMP_SCALE
    values: Mapping[str, float] | None = None


def rating_scale(labels: Sequence[str] | None) -> RatingScale:
    """The scale of a rating task's labels: numbers from the smallest to the largest, text labels 1..K in
    the order listed; LaMP's 1-5 without labels (a scale inferred from the golds could be narrower than
    the real one)."""
    if not labels:
        return RatingScale()
    values = rating_values(labels)
    if values is None:
        numbers = [float(label) for label in labels]
        return RatingScale((min(numbers), max(numbers)))
    return RatingScale((1.0, float(len(values))), values)


def _user_groups(user_ids: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for index, uid in enumerate(user_ids):
        groups.setdefault(str(uid), []).append(index)
    return dict(sorted(groups.items()))


def _metric_value(
    name: str, golds: list[Gold], preds: list[str], labels: Sequence[str], scale: RatingScale
) -> float:
    texts = [_as_text(g) for g in golds]
    if name == "accuracy":
        return accuracy(texts, preds, labels)
    if name == "f1":
        return macro_f1(texts, preds, labels)
    if name == "lenient_accuracy":
        return lenient_accuracy(golds, preds, labels)
    if name == "mae":
        return mae(texts, preds, scale.ends, scale.values)
    return rmse(texts, preds, scale.ends, scale.values)


def _user_f1(golds: list[Gold], preds: list[str], labels: Sequence[str]) -> float:
    """A user's macro-F1 over the labels that occur in their golds or outputs: over all labels, a user with
    a handful of items would score 0 on every label they never met."""
    texts = [_as_text(g) for g in golds]
    present = {label_index(t, labels) for t in [*texts, *preds]} - {-1}
    return macro_f1(texts, preds, labels, only=present)


def score(
    task_kind_or_metrics: str | Sequence[str],
    golds: Sequence[Gold],
    preds: Sequence[str | None],
    user_ids: Sequence[str],
    labels: Sequence[str] | None = None,
    stemmer: bool = False,
) -> dict[str, Any]:
    """Every metric pooled over examples and as a per-user mean, plus each user's value.

    ``task_kind_or_metrics`` is a task kind ("classification", ...) or metric names. Without ``labels``,
    label metrics use the sorted set of gold labels and ratings LaMP's 1-5 scale; with them, ratings are
    read on their scale (``rating_scale``: text labels count as their position in the order given).
    """
    names = _metric_names(task_kind_or_metrics)
    if not (len(golds) == len(preds) == len(user_ids)):
        raise ValueError(
            f"{len(golds)} golds, {len(preds)} predictions and {len(user_ids)} user ids differ in length"
        )
    if not golds:
        raise ValueError("nothing to score: no examples")
    golds = list(golds)
    preds = ["" if p is None else str(p) for p in preds]
    scale = rating_scale(labels)
    labels = (
        tuple(labels) if labels is not None else tuple(sorted({x for g in golds for x in gold_labels(g)}))
    )
    groups = _user_groups(user_ids)
    wants_rouge = any(name.startswith("rouge") for name in names)
    rouge = rouge_per_example([_as_text(g) for g in golds], preds, stemmer) if wants_rouge else {}
    pooled: dict[str, float] = {}
    per_user: dict[str, dict[str, float]] = {}
    for name in names:
        if name in rouge:
            pooled[name] = float(np.mean(rouge[name]))
            per_user[name] = {u: float(np.mean([rouge[name][i] for i in idx])) for u, idx in groups.items()}
        else:
            pooled[name] = _metric_value(name, golds, preds, labels, scale)
            per_user[name] = {
                u: _user_value(name, [golds[i] for i in idx], [preds[i] for i in idx], labels, scale)
                for u, idx in groups.items()
            }
    return {
        "metrics": list(names),
        "pooled": pooled,
        "user_mean": {name: float(np.mean(list(per_user[name].values()))) for name in names},
        "per_user": per_user,
        "n_examples": len(golds),
        "n_users": len(groups),
        "lower_is_better": [n for n in names if n in LOWER_IS_BETTER],
    }


def _numeric(labels: Sequence[str]) -> bool:
    try:
        [float(label) for label in labels]
    except ValueError:
        return False
    return True


def _user_value(
    name: str, golds: list[Gold], preds: list[str], labels: Sequence[str], scale: RatingScale
) -> float:
    if name == "f1":
        return _user_f1(golds, preds, labels)
    return _metric_value(name, golds, preds, labels, scale)


# --- bootstrap over users ----------------------------------------------------------------------------------


def _values(per_user: Mapping[str, float] | Sequence[float]) -> np.ndarray:
    if isinstance(per_user, Mapping):
        per_user = [per_user[key] for key in sorted(per_user)]
    values = np.asarray(list(per_user), dtype=float)
    if values.size == 0:
        raise ValueError("no per-user values to resample")
    if not np.all(np.isfinite(values)):
        raise ValueError("per-user values must be finite numbers")
    return values


def _resampled_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples of the users with replacement, drawn in memory-bounded batches."""
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    rng = np.random.default_rng(seed)
    rows_per_batch = max(1, _CHUNK_CELLS // values.size)
    means = []
    for start in range(0, n_resamples, rows_per_batch):
        rows = min(rows_per_batch, n_resamples - start)
        means.append(values[rng.integers(0, values.size, size=(rows, values.size))].mean(axis=1))
    return np.concatenate(means)


def bootstrap_ci(
    per_user_values: Mapping[str, float] | Sequence[float],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile confidence interval of the per-user mean, resampling users (not examples), since users are
    the unit a personalization result has to generalise over."""
    if not 0 < level < 1:
        raise ValueError("level must be between 0 and 1")
    values = _values(per_user_values)
    means = _resampled_means(values, n_resamples, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def _paired(
    a: Mapping[str, float] | Sequence[float], b: Mapping[str, float] | Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise ValueError("pass both methods' per-user values as mappings, or both as sequences")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            raise ValueError(
                f"the two methods were scored on different users (only a: {only_a[:3]}, only b: {only_b[:3]})"
            )
        return _values(a), _values(b)
    first, second = _values(a), _values(b)
    if first.size != second.size:
        raise ValueError(f"{first.size} and {second.size} per-user values: not the same users")
    return first, second


def paired_bootstrap(
    a_per_user: Mapping[str, float] | Sequence[float],
    b_per_user: Mapping[str, float] | Sequence[float],
    n_resamples: int = 10_000,
    seed: int = 0,
    lower_is_better: bool = False,
) -> float:
    """One-sided p-value that method a is better than method b on the same users.

    The users are resampled together for both methods; p is the share of resamples in which a is not
    better, with the add-one correction that keeps a Monte Carlo p-value above zero.
    """
    a, b = _paired(a_per_user, b_per_user)
    gains = (b - a) if lower_is_better else (a - b)
    means = _resampled_means(gains, n_resamples, seed)
    return float((np.count_nonzero(means <= 0) + 1) / (n_resamples + 1))


# --- how many users a difference needs ---------------------------------------------------------------------


def paired_sd(
    a_per_user: Mapping[str, float] | Sequence[float], b_per_user: Mapping[str, float] | Sequence[float]
) -> float:
    """Standard deviation (n - 1) over users of the per-user difference a - b: the spread a paired test
    over users has to see a mean difference through."""
    a, b = _paired(a_per_user, b_per_user)
    if a.size < 2:
        raise ValueError("the spread of per-user differences needs at least 2 users")
    return float(np.std(a - b, ddof=1))


def users_needed(diff_sd: float, delta: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Users a one-sided paired test at level ``alpha`` needs to detect a true mean difference ``delta``
    with probability ``power``, when per-user differences spread by ``diff_sd`` (``paired_sd``).

    The normal approximation n = ((z_{1-alpha} + z_{power}) * diff_sd / delta)^2, rounded up; at least 2,
    since a paired test needs two users to see any spread. The bootstrap over users the report uses is
    close to this z test: ``tests/test_metrics.py`` checks its power by simulation.
    """
    if not (math.isfinite(diff_sd) and diff_sd >= 0):
        raise ValueError(f"the spread of per-user differences must be a finite number >= 0, not {diff_sd}")
    if not (math.isfinite(delta) and delta != 0):
        raise ValueError(f"the difference to detect must be a finite non-zero number, not {delta}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must be between 0 and 1 (got alpha {alpha}, power {power})")
    normal = NormalDist()
    z = normal.inv_cdf(1 - alpha) + normal.inv_cdf(power)
    return max(2, math.ceil((z * diff_sd / abs(delta)) ** 2))
