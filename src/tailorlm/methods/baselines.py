"""Simple baselines a recommender engineer would bring: the user's most frequent label, the user's mean
rating, item mean plus user bias, the item's majority label, and for generation the user's most similar
earlier output. They read only training splits, never any test item."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence

from tailorlm.data import render
from tailorlm.data.schema import Task, User
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


def nearest_output(task: Task, users: Sequence[User]) -> Iterator[UserAnswers]:
    """For generation: the output of the user's most similar (BM25) visible history item that is one of
    their training examples. The output is that example's target: history items carry it under no common
    field name (LaMP's profile items have none called ``target``)."""
    retriever = BM25Retriever()
    for user in users:
        outputs = {e.source_id or e.id: e.target for e in task.training_examples(user)}
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
    if task.ordinal:
        found["user-mean"] = user_mean
        if has_items:
            found["item-user-bias"] = item_user_bias
    return found
