"""Per-user train / validation / test splits, deterministic from a seed.

Two per-user policies, as the reference systems use them, and one across users:

- stratified (PEFT-U, subjective tasks): a user's items are split 80/10/10 with every label spread over the
  three parts in proportion; users with fewer than ``MIN_ITEMS`` items are dropped, as PEFT-U drops them.
- chronological (histories): a user's latest items are their test, the ones just before are validation,
  everything earlier is train, so nothing a user did later can be trained on or retrieved for an earlier
  question.
- held-out items (cold-start items, as recommender evaluations hold them out): a seeded share of the
  task's items is test for every user who answered them and another share validation, so no training
  answer of anyone is about a test item; what is known of an item then comes only from its text.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

MIN_ITEMS = 10
VAL, TEST = 0.1, 0.1


def user_rng(seed: int, user_id: str) -> np.random.Generator:
    """A generator that depends only on the seed and the user, never on the order users are visited in."""
    return np.random.default_rng([seed, zlib.crc32(user_id.encode("utf-8"))])


def stratified_split(
    items: Sequence[T], label_of: Callable[[T], str], key_of: Callable[[T], str], user_id: str, seed: int
) -> tuple[list[T], list[T], list[T]]:
    """Split one user's items 80/10/10, stratified by label.

    Items are sorted by (label, key) so the input order never matters, shuffled within each label and laid
    out label after label; test and then validation are systematic samples (evenly spaced, from a seeded
    offset) of that layout. Each label therefore lands in each part in proportion, the part sizes are
    exactly 10% (rounded half up, at least one), and a user with ten items gets 8 / 1 / 1.
    """
    rng = user_rng(seed, user_id)
    ordered = sorted(items, key=lambda item: (label_of(item), key_of(item)))
    laid_out: list[T] = []
    for _, group in itertools.groupby(ordered, key=label_of):
        members = list(group)
        laid_out.extend(members[i] for i in rng.permutation(len(members)))
    test_at = set(_systematic(len(laid_out), held_out_count(len(laid_out), TEST), rng))
    rest = [item for i, item in enumerate(laid_out) if i not in test_at]
    val_at = set(_systematic(len(rest), held_out_count(len(laid_out), VAL), rng))
    test = [item for i, item in enumerate(laid_out) if i in test_at]
    val = [item for i, item in enumerate(rest) if i in val_at]
    train = [item for i, item in enumerate(rest) if i not in val_at]
    return train, val, test


def _systematic(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """``k`` evenly spaced positions out of ``n`` (k <= n), starting at a random offset."""
    offset = rng.random()
    return [int((j + offset) * n / k) for j in range(k)]


def held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` items a ``fraction`` is, rounded half up, at least one."""
    return max(1, int(n * fraction + 0.5))


def chronological_split(
    items: Sequence[T], order_of: Callable[[T], tuple]
) -> tuple[list[T], list[T], list[T]]:
    """Split one user's items by time: the latest 10% test, the 10% before them validation, the rest train.

    ``order_of`` must give a total order (time first, then an id) so that ties are broken the same way on
    every run.
    """
    timeline = sorted(items, key=order_of)
    n_test = held_out_count(len(timeline), TEST)
    n_val = held_out_count(len(timeline), VAL)
    if len(timeline) < n_test + n_val + 1:
        raise ValueError(f"{len(timeline)} items are too few for a chronological split")
    cut_val = len(timeline) - n_test - n_val
    cut_test = len(timeline) - n_test
    return timeline[:cut_val], timeline[cut_val:cut_test], timeline[cut_test:]


ITEM_TEST, ITEM_VAL = 0.2, 0.1  # shares of the items held out: enough distinct test items to mean something


def held_out_items(keys: Sequence[str], seed: int) -> tuple[frozenset[str], frozenset[str]]:
    """The (test, validation) item keys of ``keys``: seeded shares ``ITEM_TEST`` and ``ITEM_VAL`` (each
    rounded half up, at least one), independent of the order ``keys`` come in."""
    ordered = sorted(set(keys))
    if len(ordered) < 3:
        raise ValueError(f"{len(ordered)} distinct items are too few to hold out test and validation items")
    order = np.random.default_rng([seed, zlib.crc32(b"held-out items")]).permutation(len(ordered))
    n_test = held_out_count(len(ordered), ITEM_TEST)
    n_val = held_out_count(len(ordered), ITEM_VAL)
    test = frozenset(ordered[i] for i in order[:n_test])
    val = frozenset(ordered[i] for i in order[n_test : n_test + n_val])
    return test, val
