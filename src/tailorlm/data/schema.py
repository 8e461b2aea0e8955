"""The user-centric data model: a task, its users, each user's history and labelled examples.

Every loader produces these objects, and everything downstream (prompts, per-user modules, retrieval,
scoring) reads only these, so the visibility rules below are enforced in one place: what may be shown or
trained for a user when asking one of their examples is decided by ``Task.history_for`` and
``Task.training_examples``, never by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    # Type-only: specs imports KINDS and Kind from this module at run time, so a run-time import back
    # would be a cycle; Task.spec is only an annotation here.
    from tailorlm.data.specs import TaskSpec

Kind = Literal["classification", "multilabel", "rating", "generation"]
KINDS: tuple[str, ...] = ("classification", "multilabel", "rating", "generation")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class HistoryItem:
    """One thing the user did before, as it reads when retrieved (``text``) and as raw ``fields``."""

    id: str
    text: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    time: float | None = None


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled input of one user.

    ``source_id`` names the history item this example was made from (it must never be shown when asking
    the example itself). ``visible_before`` is how many of the user's history items (in time order) may be
    seen when asking it, ``None`` for all; ``visible_ids`` restricts that further to an explicit set (a LaMP
    question carries its own profile).
    """

    id: str
    text: str
    target: str
    targets: tuple[str, ...]
    item_key: str | None = None
    time: float | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    source_id: str | None = None
    visible_before: int | None = None
    visible_ids: frozenset[str] | None = None


@dataclass(slots=True)
class User:
    id: str
    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    history: list[HistoryItem] = field(default_factory=list)
    fields: Mapping[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def examples(self) -> list[Example]:
        return [*self.train, *self.val, *self.test]


@dataclass(slots=True)
class Task:
    """A named task with its users. ``chronological`` says the history is a timeline (only earlier items
    are visible); ``source`` says where the data was read from."""

    name: str
    kind: Kind
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    users: list[User]
    spec: TaskSpec
    source: str = ""
    chronological: bool = False
    _hidden: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    _by_id: dict[str, User] = field(default_factory=dict, repr=False)

    @property
    def ordinal(self) -> bool:
        """Labels with an order: ratings, and label sets the task declares ordered (verbagg's no < perhaps
        < yes)."""
        return self.labels is not None and (self.kind == "rating" or bool(self.spec.options.get("ordinal")))

    def user(self, user_id: str) -> User:
        if not self._by_id:
            self._by_id = {u.id: u for u in self.users}
        try:
            return self._by_id[user_id]
        except KeyError:
            raise KeyError(f"task {self.name} has no user {user_id!r}") from None

    def history_for(self, user: User, example: Example) -> list[HistoryItem]:
        """What may be retrieved or profiled when asking ``example``: never the example itself, never an
        item of the user's val or test examples, and on a timeline only what came strictly before it."""
        items = user.history if example.visible_before is None else user.history[: example.visible_before]
        hidden = self._hidden_for(user)
        own = {example.id, example.source_id}
        allowed = example.visible_ids
        return [
            item
            for item in items
            if item.id not in hidden and item.id not in own and (allowed is None or item.id in allowed)
        ]

    def training_examples(self, user: User) -> list[Example]:
        """What a per-user module may train on: the user's train split, minus anything that is also one
        of their val or test items (a guard against a loader mistake, not a filter that should fire)."""
        hidden = self._hidden_for(user)
        return [e for e in user.train if e.id not in hidden and (e.source_id or e.id) not in hidden]

    def _hidden_for(self, user: User) -> frozenset[str]:
        cached = self._hidden.get(user.id)
        if cached is None:
            held_out = [*user.val, *user.test]
            cached = frozenset(
                [e.id for e in held_out] + [e.source_id for e in held_out if e.source_id is not None]
            )
            self._hidden[user.id] = cached
        return cached

    def count(self, split: str | None = None) -> int:
        splits = SPLITS if split is None else (split,)
        return sum(len(u.split(s)) for u in self.users for s in splits)

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, kind={self.kind!r}, users={len(self.users)}, "
            f"examples={self.count()}, source={self.source!r})"
        )
