"""PAG: a short textual profile of each user, written by the base model from a seeded sample of the
history every one of their test queries may see, cached on disk per (model, task, user, sample)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from tailorlm import models
from tailorlm.data.schema import HistoryItem, Task, User
from tailorlm.engine.engine import Engine
from tailorlm.engine.generation import DecodeConfig
from tailorlm.files import atomic_write_text

PROFILE_INSTRUCTION = (
    "Here is what one person did or answered before:\n{items}\n\n"
    "In two short sentences, describe this person's tendencies and preferences. Be specific."
)
PROFILE_VERSION = 1  # bump when the instruction changes, so cached profiles are rewritten


def visible_to_all(task: Task, user: User, split: str = "test") -> list[HistoryItem]:
    """History items visible when asking every example of ``split``: a profile built from them leaks
    nothing to any of those queries."""
    examples = user.split(split)
    if not examples:
        return []
    allowed = None
    for example in examples:
        ids = {item.id for item in task.history_for(user, example)}
        allowed = ids if allowed is None else allowed & ids
    return [item for item in user.history if item.id in (allowed or set())]


class ProfileWriter:
    """Generates and caches profiles; ``cache_file`` holds them as JSON keyed by a content hash."""

    def __init__(
        self,
        engine: Engine,
        task: Task,
        cache_file: Path,
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
        self._cache: dict[str, str] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}

    def _sample(self, user: User, pool: Sequence[HistoryItem]) -> list[HistoryItem]:
        chosen = list(pool)
        random.Random(f"{self.seed}:{user.id}").shuffle(chosen)
        return sorted(chosen[: self.items], key=lambda item: pool.index(item))

    def _key(self, user: User, sample: Sequence[HistoryItem]) -> str:
        identity = [PROFILE_VERSION, self.engine.base.name, self.task.name, user.id, [i.id for i in sample]]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]

    def profiles(self, users: Sequence[User], split: str = "test", batch_size: int = 8) -> dict[str, str]:
        """Profiles of ``users``, generating only those not cached."""
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
        return {uid: self._cache[key] for uid, (key, _) in wanted.items()}

    def _prompt(self, sample: Sequence[HistoryItem]) -> str:
        listing = "\n".join(f"- {item.text}" for item in sample) or "- (nothing yet)"
        return models.chat_prompt(self.engine.tokenizer, PROFILE_INSTRUCTION.format(items=listing))

    def _save(self) -> None:
        atomic_write_text(self.cache_file, json.dumps(self._cache, indent=1, sort_keys=True))
