"""Prompt recipes: what goes into a prompt besides the query (few-shot examples, retrieved history, a
profile), and turning (user, example) into the chat-formatted prompt the engine runs, together with a
record of what went into it (``Provenance``), so the visibility rules can be checked on the prompts a run
really built instead of on a second copy of this code."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tailorlm import models
from tailorlm.data import render
from tailorlm.data.schema import Example, Task, User
from tailorlm.methods.retrieval import Retriever

if TYPE_CHECKING:
    # Type-only: profiles builds its prompts with models.chat_prompt and needs nothing from here.
    from tailorlm.methods.profiles import ProfileSource


@dataclass(frozen=True)
class Recipe:
    shots: bool = False
    retrieval: str | None = None  # "bm25" | "dense"
    profile: bool = False

    @property
    def tag(self) -> str:
        parts = [
            p
            for p, on in (
                ("shots", self.shots),
                (self.retrieval or "", bool(self.retrieval)),
                ("profile", self.profile),
            )
            if on
        ]
        return "+".join(parts) or "plain"


@dataclass(frozen=True)
class Provenance:
    """What went into one prompt, by id: enough to check every visibility rule without reading its text.

    ``user`` asked ``example``; ``shots`` are the ids of the labelled examples shown, ``retrieved`` the ids
    of the history items shown; ``profile_of`` is whose profile was included (``None``: no profile) and
    ``profile_items`` the history items that profile was written from. ``instruction`` and ``layout`` say
    which of the task's templates framed it (``lamp``: items written into the question; ``blocks``: one
    block per part). ``content_free`` marks a calibration twin, its query blanked.
    """

    task: str
    user: str
    example: str
    recipe: str
    instruction: str
    layout: Literal["lamp", "blocks"]
    shots: tuple[str, ...] = ()
    retrieved: tuple[str, ...] = ()
    profile_of: str | None = None
    profile_items: tuple[str, ...] = ()
    content_free: bool = False

    @property
    def shown(self) -> frozenset[str]:
        """Ids of everything of the user's data in the prompt besides the query itself."""
        return frozenset([*self.shots, *self.retrieved, *self.profile_items])


@dataclass(frozen=True)
class Prompt:
    text: str  # chat-formatted: what the engine runs
    provenance: Provenance


Purpose = Literal["answer", "train", "validate"]


@dataclass(frozen=True)
class PromptUse:
    """One prompt a setup built and what it was for: answering for ``method``, or training or validating
    the module of ``module`` (a user id, or the task adapter's ``TaskAdapterSetup.USER``) stored under
    ``method`` (a method's name, or the task adapter's store)."""

    method: str
    purpose: Purpose
    module: str | None
    prompt: Provenance


PromptTrace = Callable[[PromptUse], None]


def few_shot(task: Task, user: User, example: Example, max_shots: int = 3, seed: int = 0) -> list[Example]:
    """PEFT-U's few-shot examples: the user's own train examples, at most one per label, never the item
    being asked (PEFT-U's code compared a list to a string there and could show the asked item)."""
    pool = [
        e
        for e in task.training_examples(user)
        if e.id != example.id and not (example.item_key is not None and e.item_key == example.item_key)
    ]
    random.Random(f"{seed}:{user.id}:{example.id}").shuffle(pool)
    if task.labels is None:
        return pool[:max_shots]
    chosen: dict[str, Example] = {}
    for candidate in pool:
        chosen.setdefault(candidate.targets[0] if candidate.targets else candidate.target, candidate)
    by_label_order = [chosen[label] for label in task.labels if label in chosen]
    return by_label_order[:max_shots]


@dataclass
class PromptBuilder:
    """Builds prompts for one task under one recipe; the retriever and the profiles are handed in."""

    task: Task
    tokenizer: object
    recipe: Recipe
    k: int = 3
    retriever: Retriever | None = None
    profiles: ProfileSource | None = None
    seed: int = 0
    # LaMP questions only: the words of retrieved items written into the question, split among them the
    # way LaMP splits its token budget (``render.prompt``); None: no cap.
    budget_words: int | None = 256

    def message(self, user: User, example: Example, content_free: bool = False) -> tuple[str, Provenance]:
        """The user message and what went into it; ``content_free`` keeps the context the real query gets
        (its shots, retrieved items and profile) and blanks the query itself, for contextual calibration."""
        shots = few_shot(self.task, user, example, seed=self.seed) if self.recipe.shots else []
        retrieved = []
        if self.recipe.retrieval:
            if self.retriever is None:
                raise ValueError(f"recipe {self.recipe.tag} retrieves, but the builder has no retriever")
            candidates = self.task.history_for(user, example)
            retrieved = self.retriever.top_k(render.query(self.task, example), candidates, self.k)
        profile = None
        if self.recipe.profile:
            if self.profiles is None:
                raise ValueError(f"recipe {self.recipe.tag} includes a profile, but the builder has none")
            profile = self.profiles.profile(user)
        asked = render.content_free(self.task, example) if content_free else example
        text = render.prompt(
            self.task,
            asked,
            shots,
            retrieved,
            profile.text if profile else None,
            budget_words=self.budget_words,
        )
        provenance = Provenance(
            task=self.task.name,
            user=user.id,
            example=example.id,
            recipe=self.recipe.tag,
            instruction=self.task.spec.instruction,
            layout="lamp" if self.task.spec.family == "lamp" else "blocks",
            shots=tuple(s.id for s in shots),
            retrieved=tuple(item.id for item in retrieved),
            profile_of=profile.user if profile else None,
            profile_items=profile.items if profile else (),
            content_free=content_free,
        )
        return text, provenance

    def text(self, user: User, example: Example, content_free: bool = False) -> str:
        """The user message alone (before the chat template)."""
        return self.message(user, example, content_free)[0]

    def build(self, user: User, example: Example, content_free: bool = False) -> Prompt:
        """The chat-formatted prompt with its provenance."""
        text, provenance = self.message(user, example, content_free)
        return Prompt(models.chat_prompt(self.tokenizer, text), provenance)
