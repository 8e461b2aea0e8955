"""Simple baselines a recommender engineer would bring: the user's most frequent label, the user's mean
rating, item mean plus user bias, the item's majority label, the user's and the item's label priors
combined, damped user and item biases and matrix factorisation (Surprise's ``BaselineOnly`` and ``SVD``),
and for generation the user's most similar earlier output. They read only training splits, never any
test item. A baseline that holds a distribution over the labels answers what suits the task's first
metric: the median for MAE, the label nearest the mean for RMSE, the most likely label otherwise."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence

from tailorlm.data import render
from tailorlm.data.schema import Example, Task, User
from tailorlm.methods.decoding import UserAnswers
from tailorlm.methods.retrieval import BM25Retriever


def _position(task: Task, label: str) -> float:
    return float(task.labels.index(label))


def _nearest_label(task: Task, position: float) -> str:
    index = min(max(round(position), 0), len(task.labels) - 1)
    return task.labels[index]


def _most_frequent(targets: Sequence[str], tie_order: Sequence[str]) -> str:
    counts = Counter(targets)
    best = max(counts.values())
    return next(label for label in tie_order if counts.get(label) == best)


def _global_order(task: Task) -> list[str]:
    counts = Counter(e.targets[0] for u in task.users for e in task.training_examples(u) if e.targets)
    return sorted(task.labels, key=lambda label: (-counts.get(label, 0), task.labels.index(label)))


def user_majority(task: Task, users: Sequence[User]) -> Iterator[UserAnswers]:
    """The user's most frequent training label; ties (and users without labels) go to the label most
    frequent over every user's training answers."""
    order = _global_order(task)
    for user in users:
        targets = [e.targets[0] for e in task.training_examples(user) if e.targets]
        label = _most_frequent(targets, order) if targets else order[0]
        yield user, [label] * len(user.test), 0.0


def user_mean(task: Task, users: Sequence[User]) -> Iterator[UserAnswers]:
    """The user's mean training rating (labels counted by position), rounded to the nearest label."""
    for user in users:
        positions = [_position(task, e.targets[0]) for e in task.training_examples(user) if e.targets]
        mean = sum(positions) / len(positions)
        yield user, [_nearest_label(task, mean)] * len(user.test), 0.0


def _item_stats(task: Task) -> tuple[dict[str, list[str]], float]:
    """Every user's training answers per item (test and validation answers are never read)."""
    by_item: dict[str, list[str]] = defaultdict(list)
    for user in task.users:
        for example in task.training_examples(user):
            if example.item_key is not None and example.targets:
                by_item[example.item_key].append(example.targets[0])
    everything = [_position(task, t) for answers in by_item.values() for t in answers]
    return by_item, sum(everything) / max(1, len(everything))


def item_user_bias(task: Task, users: Sequence[User]) -> Iterator[UserAnswers]:
    """Item mean plus the user's mean deviation from the item means on their own training items; an item
    nobody answered in training counts with the mean of every training answer."""
    by_item, global_mean = _item_stats(task)
    item_mean = {
        item: sum(_position(task, t) for t in answers) / len(answers) for item, answers in by_item.items()
    }
    for user in users:
        deviations = [
            _position(task, e.targets[0]) - item_mean.get(e.item_key, global_mean)
            for e in task.training_examples(user)
            if e.targets
        ]
        bias = sum(deviations) / len(deviations) if deviations else 0.0
        predictions = [_nearest_label(task, item_mean.get(e.item_key, global_mean) + bias) for e in user.test]
        yield user, predictions, 0.0


def item_majority(task: Task, users: Sequence[User]) -> Iterator[UserAnswers]:
    """The label most users gave the item in training (non-personal); ties, and items nobody answered,
    go to the label most frequent over every training answer."""
    by_item, _ = _item_stats(task)
    order = _global_order(task)
    for user in users:
        predictions = [
            _most_frequent(by_item[e.item_key], order) if by_item.get(e.item_key) else order[0]
            for e in user.test
        ]
        yield user, predictions, 0.0


# Pseudo-answers drawn from the global label distribution added to each user's and each item's counts, so a
# label a user (or item) never gave keeps a small probability instead of vetoing the product.
PRIOR_STRENGTH = 1.0


def answer_rule(task: Task) -> str:
    """How a distribution over ``task.labels`` is answered under the task's first metric: ``median`` for
    MAE and ``mean`` for RMSE on ordered labels, ``mode`` otherwise."""
    primary = task.metrics[0] if task.metrics else "accuracy"
    if task.ordinal and primary in ("mae", "rmse"):
        return "median" if primary == "mae" else "mean"
    return "mode"


ANSWER_RULES = ("median", "mean", "mode")


def label_by_rule(rule: str, labels: Sequence[str], probabilities: Sequence[float]) -> str:
    """The label of ``labels`` (in their order) that ``rule`` (``answer_rule``) answers from
    ``probabilities``: the median's, the nearest to the mean, or the most likely (the first on a tie)."""
    if rule == "median":
        total, seen = sum(probabilities), 0.0
        for label, p in zip(labels, probabilities, strict=True):
            seen += p
            if seen >= total / 2:
                return label
    if rule == "mean":
        mean = sum(i * p for i, p in enumerate(probabilities)) / sum(probabilities)
        return labels[min(max(round(mean), 0), len(labels) - 1)]
    return labels[max(range(len(labels)), key=lambda i: (probabilities[i], -i))]


def suited_label(task: Task, probabilities: Sequence[float]) -> str:
    """The label a distribution over ``task.labels`` answers under the task's first metric."""
    return label_by_rule(answer_rule(task), task.labels, probabilities)


def smoothed(counts: Counter, labels: Sequence[str], prior: Sequence[float]) -> list[float]:
    total = sum(counts[label] for label in labels)
    return [
        (counts[label] + PRIOR_STRENGTH * p) / (total + PRIOR_STRENGTH)
        for label, p in zip(labels, prior, strict=True)
    ]


class LabelPrior:
    """The user's label prior times the item's label prior over the global prior, each smoothed toward the
    global prior, from every user's training answers (never a validation or test answer): who the user is
    and what the item is, as independent evidence. An example without an item id gets the user's prior."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.by_item, _ = _item_stats(task)
        overall = Counter(t for answers in self.by_item.values() for t in answers)
        overall.update(
            e.targets[0]
            for u in task.users
            for e in task.training_examples(u)
            if e.item_key is None and e.targets
        )
        total = sum(overall[label] for label in task.labels)
        # add-one: no label has probability zero
        self.prior = [(overall[label] + 1) / (total + len(task.labels)) for label in task.labels]
        self._own: dict[str, list[float]] = {}

    def user(self, user: User) -> list[float]:
        if user.id not in self._own:
            counts = Counter(e.targets[0] for e in self.task.training_examples(user) if e.targets)
            self._own[user.id] = smoothed(counts, self.task.labels, self.prior)
        return self._own[user.id]

    def distribution(self, user: User, example: Example) -> list[float]:
        """Probabilities over ``task.labels`` (they sum to one)."""
        item = smoothed(Counter(self.by_item.get(example.item_key, ())), self.task.labels, self.prior)
        product = [u * i / g for u, i, g in zip(self.user(user), item, self.prior, strict=True)]
        total = sum(product)
        return [p / total for p in product]


def user_item_prior(task: Task, users: Sequence[User]) -> Iterator[UserAnswers]:
    """``LabelPrior``'s distribution, answered as suits the task's metric."""
    prior = LabelPrior(task)
    for user in users:
        yield user, [suited_label(task, prior.distribution(user, e)) for e in user.test], 0.0


def fit_surprise(task: Task, algorithm):
    """``algorithm`` fitted on every user's training answers to shared items, as label positions."""
    import pandas as pd
    from surprise import Dataset, Reader

    rows = [
        (user.id, example.item_key, _position(task, example.targets[0]))
        for user in task.users
        for example in task.training_examples(user)
        if example.item_key is not None and example.targets
    ]
    frame = pd.DataFrame(rows, columns=["user", "item", "position"])
    data = Dataset.load_from_df(frame, Reader(rating_scale=(0, len(task.labels) - 1)))
    algorithm.fit(data.build_full_trainset())
    return algorithm


def _surprise_answers(task: Task, users: Sequence[User], algorithm) -> Iterator[UserAnswers]:
    fitted = fit_surprise(task, algorithm)
    for user in users:
        predictions = [_nearest_label(task, fitted.predict(user.id, e.item_key).est) for e in user.test]
        yield user, predictions, 0.0


def damped_biases(task: Task, users: Sequence[User]) -> Iterator[UserAnswers]:
    """Global mean plus regularised user and item biases (Koren's baseline estimates, fitted by
    Surprise's ``BaselineOnly`` with its defaults: ALS, reg_u 15, reg_i 10), rounded to the nearest
    label; an unseen user or item has bias 0."""
    from surprise import BaselineOnly

    return _surprise_answers(task, users, BaselineOnly(verbose=False))


def matrix_factorisation(task: Task, users: Sequence[User]) -> Iterator[UserAnswers]:
    """Biased matrix factorisation (Surprise's ``SVD``, its defaults: 100 factors, 20 epochs, seeded),
    rounded to the nearest label."""
    from surprise import SVD

    return _surprise_answers(task, users, SVD(random_state=0))


def nearest_output(task: Task, users: Sequence[User]) -> Iterator[UserAnswers]:
    """For generation: the output of the user's most similar (BM25) visible history item. An item that is
    one of the user's training examples has that example's target; any other (a LaMP profile item that
    not every question of the user may see) has the output the task's profile template reads from its
    fields (LaMP-5: its title). History items carry the output under no common field name."""
    retriever = BM25Retriever()
    template = task.spec.options.get("profile_example", {}).get("target")
    for user in users:
        outputs = {e.source_id or e.id: e.target for e in task.training_examples(user)}
        if template is not None:
            for item in user.history:
                outputs.setdefault(item.id, render.fill(template, item.fields))
        predictions = []
        for example in user.test:
            visible = [item for item in task.history_for(user, example) if item.id in outputs]
            best = retriever.top_k(render.query(task, example), visible, 1)
            predictions.append(outputs[best[0].id] if best else "")
        yield user, predictions, 0.0


Baseline = Callable[[Task, Sequence[User]], Iterator[UserAnswers]]


def applicable(task: Task) -> dict[str, Baseline]:
    """The simple baselines that make sense for the task's kind."""
    if task.labels is None:
        return {"nearest-output": nearest_output}
    found: dict[str, Baseline] = {"user-majority": user_majority}
    has_items = any(e.item_key is not None for u in task.users[:50] for e in u.test)
    if has_items:
        found["item-majority"] = item_majority
        found["user-item-prior"] = user_item_prior
    if task.ordinal:
        found["user-mean"] = user_mean
        if has_items:
            found["item-user-bias"] = item_user_bias
            found["damped-biases"] = damped_biases
            found["matrix-factorisation"] = matrix_factorisation
    return found
