"""Prompt recipes: what goes into a prompt besides the query (few-shot examples, retrieved history, a
profile), and turning (user, example) into the chat-formatted prompt the engine runs."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tailorlm import models
from tailorlm.data import render
from tailorlm.data.schema import Example, Task, User
from tailorlm.methods.retrieval import Retriever


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


def few_shot(task: Task, user: User, example: Example, max_shots: int = 3, seed: int = 0) -> list[Example]:
    """PEFT-U's few-shot choice: the user's own train examples, at most one per label, never the item
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
    """Builds prompts for one task under one recipe; retrievers and profiles come from the run."""

    task: Task
    tokenizer: object
    recipe: Recipe
    k: int = 3
    retriever: Retriever | None = None
    profiles: Callable[[User], str] | None = None
    seed: int = 0
    budget_words: int | None = 256

    def text(self, user: User, example: Example, content_free: bool = False) -> str:
        """The user message; ``content_free`` keeps the context the real query gets (its shots, retrieved
        items and profile) and blanks the query itself, for contextual calibration."""
        shots = few_shot(self.task, user, example, seed=self.seed) if self.recipe.shots else ()
        retrieved = ()
        if self.recipe.retrieval:
            candidates = self.task.history_for(user, example)
            retrieved = self.retriever.top_k(render.query(self.task, example), candidates, self.k)
        profile = self.profiles(user) if self.recipe.profile else None
        asked = render.content_free(self.task, example) if content_free else example
        return render.prompt(self.task, asked, shots, retrieved, profile, budget_words=self.budget_words)

    def __call__(self, user: User, example: Example, content_free: bool = False) -> str:
        return models.chat_prompt(self.tokenizer, self.text(user, example, content_free))

    def pairs(self, user: User, examples: Sequence[Example]) -> list[tuple[str, str]]:
        """(prompt, target) training pairs."""
        return [(self(user, e), e.target) for e in examples]
