"""What one benchmark run shares between methods: the task, the users under test and the users that train
the non-personal task adapter, the settings, a bare base-model engine, retrievers and profiles."""

from __future__ import annotations

import gc
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tailorlm import models
from tailorlm.data.schema import Task, User
from tailorlm.engine.engine import Engine
from tailorlm.kinds.lora import LoraSpec
from tailorlm.methods.profiles import ProfileWriter
from tailorlm.methods.recipes import PromptBuilder, Recipe
from tailorlm.methods.retrieval import Retriever, make_retriever
from tailorlm.progress import Reporter


@dataclass(frozen=True)
class BenchConfig:
    """Settings of a run. The defaults are the quick profile: sized so the default run ends within
    15 minutes on 2 CPU cores; ``full()`` lifts the user caps."""

    model: str | None = None
    seed: int = 0
    test_users: int | None = 12  # users under test (seeded sample); None: every user with test items
    adapter_users: int | None = 64  # other users the task adapter trains on; None: all of them
    adapter_examples: int | None = 256  # cap on the task adapter's training examples
    k: int = 3  # retrieved history items
    decoding: str | None = None  # None: choice for label tasks, generation otherwise
    max_new_tokens: int = 24
    max_length: int = 384  # tokens per row (prompt + target)
    users_per_step: int = 8
    epochs: int = 2
    batch_size: int = 4
    adapter_epochs: int = 1
    profile_items: int = 10

    def full(self) -> BenchConfig:
        return BenchConfig(
            **{**asdict(self), "test_users": None, "adapter_users": None, "adapter_examples": None}
        )


class RunContext:
    def __init__(
        self, task: Task, config: BenchConfig, out_dir: Path, reporter: Reporter | None = None
    ) -> None:
        self.task = task
        self.reporter = reporter or Reporter()
        self.config = config
        self.out_dir = out_dir
        self.test_users, self.adapter_users = split_users(task, config)
        self._bare: Engine | None = None
        self._retrievers: dict[str, Retriever] = {}
        self._profiles: dict[str, str] = {}

    # ---- models ------------------------------------------------------------------------------------

    def load_base(self) -> models.BaseModel:
        return models.load_base(self.config.model)

    def bare_engine(self) -> Engine:
        """The base model alone (every row in slot 0), shared by prompt-side methods and profiles."""
        if self._bare is None:
            self._bare = Engine(self.load_base(), LoraSpec(), slots=2, max_length=self.config.max_length)
        return self._bare

    def engine(self, spec, slots: int, base: models.BaseModel | None = None) -> Engine:
        return Engine(base or self.load_base(), spec, slots=slots, max_length=self.config.max_length)

    @staticmethod
    def release() -> None:
        gc.collect()

    # ---- prompt parts ------------------------------------------------------------------------------

    def retriever(self, name: str) -> Retriever:
        if name not in self._retrievers:
            self._retrievers[name] = make_retriever(name)
        return self._retrievers[name]

    def ensure_profiles(self, users: list[User]) -> None:
        missing = [u for u in users if u.id not in self._profiles]
        if missing:
            writer = ProfileWriter(
                self.bare_engine(),
                self.task,
                self.out_dir / "profiles.json",
                items=self.config.profile_items,
                seed=self.config.seed,
            )
            self._profiles.update(writer.profiles(missing))

    def profile(self, user: User) -> str:
        if user.id not in self._profiles:
            self.ensure_profiles([user])
        return self._profiles[user.id]

    def builder(self, recipe: Recipe, tokenizer) -> PromptBuilder:
        retriever = self.retriever(recipe.retrieval) if recipe.retrieval else None
        return PromptBuilder(
            self.task,
            tokenizer,
            recipe,
            k=self.config.k,
            retriever=retriever,
            profiles=self.profile,
            seed=self.config.seed,
        )


def split_users(task: Task, config: BenchConfig) -> tuple[list[User], list[User]]:
    """A seeded sample of users with test items to test on; the task adapter draws only from the rest, so
    it never sees a test user at all."""
    candidates = [u for u in task.users if u.test and task.training_examples(u)]
    order = list(candidates)
    random.Random(config.seed).shuffle(order)
    test = order if config.test_users is None else order[: config.test_users]
    test_ids = {u.id for u in test}
    others = [u for u in task.users if u.id not in test_ids and task.training_examples(u)]
    random.Random(config.seed + 1).shuffle(others)
    adapter = others if config.adapter_users is None else others[: config.adapter_users]
    position = {u.id: i for i, u in enumerate(task.users)}
    return sorted(test, key=lambda u: position[u.id]), sorted(adapter, key=lambda u: position[u.id])
