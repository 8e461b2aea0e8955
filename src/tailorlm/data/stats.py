"""Figures about a loaded task: how many users and items, how labels are spread, how much users disagree."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from tailorlm.data.schema import SPLITS, Example, Task


def spread(counts: Sequence[int]) -> dict[str, float]:
    """Median, min and max of per-user counts (zeros for no users)."""
    if not counts:
        return {"median": 0.0, "min": 0, "max": 0}
    return {"median": float(np.median(counts)), "min": int(min(counts)), "max": int(max(counts))}


def label_distribution(task: Task) -> dict[str, int]:
    """How often each label is a gold label, over every example of every split, in the task's label order."""
    counts: Counter[str] = Counter(label for u in task.users for e in u.examples() for label in e.targets)
    order = list(task.labels or ()) + sorted(set(counts) - set(task.labels or ()))
    return {label: counts[label] for label in order if counts[label]}


def _majority(answers: Counter[tuple[str, ...]], labels: Sequence[str]) -> tuple[str, ...]:
    # Ties go to the label listed first for the task, so the figure never depends on dict order.
    rank = {label: i for i, label in enumerate(labels)}
    return min(answers, key=lambda a: (-answers[a], [rank.get(x, len(rank)) for x in a], a))


def disagreement(task: Task) -> dict[str, Any] | None:
    """How often a user's answer differs from the majority answer to the same item, over items answered by
    at least two users; ``None`` when items are not shared between users (generation, LaMP)."""
    by_item: dict[str, Counter[tuple[str, ...]]] = {}
    for user in task.users:
        for example in user.examples():
            if example.item_key is not None:
                by_item.setdefault(example.item_key, Counter())[_answer(example)] += 1
    shared = {key: answers for key, answers in by_item.items() if sum(answers.values()) >= 2}
    if not shared:
        return None
    labels = task.labels or ()
    total = sum(sum(answers.values()) for answers in shared.values())
    agree = sum(answers[_majority(answers, labels)] for answers in shared.values())
    return {"rate": (total - agree) / total, "answers": total, "items": len(shared)}


def _answer(example: Example) -> tuple[str, ...]:
    return tuple(sorted(example.targets))


def summarize(task: Task) -> dict[str, Any]:
    """The figures ``tailorlm data show`` prints."""
    per_user = [len(u.examples()) for u in task.users]
    items = {e.item_key for u in task.users for e in u.examples() if e.item_key is not None}
    return {
        "task": task.name,
        "kind": task.kind,
        "source": task.source,
        "description": task.spec.description,
        "users": len(task.users),
        "examples": sum(per_user),
        "splits": {split: task.count(split) for split in SPLITS},
        "distinct_items": len(items) if items else None,
        "examples_per_user": spread(per_user),
        "history_per_user": spread([len(u.history) for u in task.users]),
        "labels": list(task.labels) if task.labels is not None else None,
        "label_distribution": label_distribution(task) if task.labels is not None else None,
        "disagreement": disagreement(task),
        "metrics": list(task.metrics),
    }
