"""PAG: a short textual profile of each user, written by the base model from a seeded sample of the
history every one of their test queries may see, cached per (model, task, user, sample) in memory and,
when a file is given, on disk."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tailorlm import models
from tailorlm.data.schema import HistoryItem, Task, User
from tailorlm.engine.engine import Engine
from tailorlm.engine.generation import DecodeConfig
from tailorlm.files import atomic_write_text
from tailorlm.progress import ProgressCallback

PROFILE_INSTRUCTION = (
    "Here is what one person did or answered before:\n{items}\n\n"
    "In two short sentences, describe this person's tendencies and preferences. Be specific."
)
PROFILE_VERSION = 1  # bump when the instruction changes, so cached profiles are rewritten


def visible_to_all(task: Task, user: User, split: str | None = "test") -> list[HistoryItem]:
    """History items visible when asking every example of ``split``: a profile built from them leaks
    nothing to any of those queries. ``split`` None: the whole history (a served user, whose queries are
    all still to come)."""
    if split is None:
        return list(user.history)
    examples = user.split(split)
    if not examples:
        return []
    allowed = None
    for example in examples:
        ids = {item.id for item in task.history_for(user, example)}
        allowed = ids if allowed is None else allowed & ids
    return [item for item in user.history if item.id in (allowed or set())]


@dataclass(frozen=True)
class UserProfile:
    """A user's profile text and the ids of the history items it was written from."""

    user: str
    text: str
    items: tuple[str, ...]


class ProfileSource(Protocol):
    def ensure(self, users: Sequence[User]) -> None:
        """Have the profiles of ``users`` ready (written together, in batches)."""

    def profile(self, user: User) -> UserProfile: ...


class ProfileWriter:
    """Generates and caches profiles; ``cache_file`` (optional) holds them as JSON keyed by a content
    hash, so a later run with the same model, task and sample reuses them."""

    def __init__(
        self,
        engine: Engine,
        task: Task,
        cache_file: Path | None = None,
        items: int = 10,
        seed: int = 0,
        max_new_tokens: int = 60,
    ) -> None:
        self.engine = engine
        self.task = task
        self.cache_file = cache_file
        self.items = items
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self._cache: dict[str, str] = {}
        if cache_file is not None and cache_file.is_file():
            self._cache = json.loads(cache_file.read_text())

    def _sample(self, user: User, pool: Sequence[HistoryItem]) -> list[HistoryItem]:
        chosen = list(pool)
        random.Random(f"{self.seed}:{user.id}").shuffle(chosen)
        return sorted(chosen[: self.items], key=lambda item: pool.index(item))

    def _key(self, user: User, sample: Sequence[HistoryItem]) -> str:
        identity = [PROFILE_VERSION, self.engine.base.name, self.task.name, user.id, [i.id for i in sample]]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]

    def profiles(
        self,
        users: Sequence[User],
        split: str | None = "test",
        batch_size: int = 8,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, UserProfile]:
        """Profiles of ``users``, generating only those not cached; ``on_progress`` hears (written,
        missing) after each batch (a few seconds each on a CPU: a run writes them for minutes)."""
        wanted: dict[str, tuple[str, list[HistoryItem]]] = {}
        for user in users:
            sample = self._sample(user, visible_to_all(self.task, user, split))
            wanted[user.id] = (self._key(user, sample), sample)
        missing = [(uid, key, sample) for uid, (key, sample) in wanted.items() if key not in self._cache]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            prompts = [self._prompt(sample) for _, _, sample in chunk]
            texts = self.engine.generate(
                prompts,
                [0] * len(chunk),
                DecodeConfig(max_new_tokens=self.max_new_tokens),
                batch_size=batch_size,
            )
            for (_, key, _), text in zip(chunk, texts, strict=True):
                self._cache[key] = " ".join(text.split())
            self._save()
            if on_progress is not None:
                on_progress(start + len(chunk), len(missing))
        return {
            uid: UserProfile(uid, self._cache[key], tuple(item.id for item in sample))
            for uid, (key, sample) in wanted.items()
        }

    def _prompt(self, sample: Sequence[HistoryItem]) -> str:
        listing = "\n".join(f"- {item.text}" for item in sample) or "- (nothing yet)"
        return models.chat_prompt(self.engine.tokenizer, PROFILE_INSTRUCTION.format(items=listing))

    def _save(self) -> None:
        if self.cache_file is not None:
            atomic_write_text(self.cache_file, json.dumps(self._cache, indent=1, sort_keys=True))


class Profiles:
    """A ``ProfileSource``: profiles written on first need by ``engine()`` (called only then, so a run
    whose profiles are all cached never builds it) and kept for the rest of the run."""

    def __init__(
        self,
        task: Task,
        engine: Callable[[], Engine],
        cache_file: Path | None = None,
        items: int = 10,
        seed: int = 0,
        max_new_tokens: int = 60,
        progress: Callable[[str], ProgressCallback] | None = None,
    ) -> None:
        # The writer (and its engine) is built on first need; until then this is all it takes to build it.
        self._make_writer = lambda: ProfileWriter(
            engine(), task, cache_file, items=items, seed=seed, max_new_tokens=max_new_tokens
        )
        self._writer: ProfileWriter | None = None
        self._profiles: dict[str, UserProfile] = {}
        self._progress = progress  # a label -> a callback that shows progress under it (``Reporter``)

    def ensure(self, users: Sequence[User]) -> None:
        missing = [u for u in users if u.id not in self._profiles]
        if not missing:
            return
        if self._writer is None:
            self._writer = self._make_writer()
        shown = self._progress(f"profiles of {len(missing)} users") if self._progress else None
        self._profiles.update(self._writer.profiles(missing, on_progress=shown))

    def profile(self, user: User) -> UserProfile:
        if user.id not in self._profiles:
            self.ensure([user])
        return self._profiles[user.id]
