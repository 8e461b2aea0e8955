"""The benchmark's settings and its two profiles (quick, full), and which users it tests on and which
train the task adapter. The methods' own settings are ``methods.deps.MethodSettings``; a config hands
them over with ``method_settings``."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

from tailorlm.data.schema import Task, User
from tailorlm.methods.deps import MethodSettings


@dataclass(frozen=True)
class BenchConfig:
    """Settings of a run. The defaults are the quick profile (``QUICK``): sized so the default run ends
    within 15 minutes on 2 CPU cores; ``full()`` (``FULL``) lifts the user caps."""

    model: str | None = None
    device: str | None = None  # tailorlm.device: auto (the GPU when present) by default
    dtype: str | None = None  # fp32 by default
    seed: int = 0
    test_users: int | None = 12  # users under test (seeded sample); None: every user with test items
    adapter_users: int | None = 64  # other users the task adapter trains on; None: all of them
    adapter_examples: int | None = 256  # cap on the task adapter's training examples
    k: int = 3  # retrieved history items
    decoding: str | None = None  # None: likelihood for label tasks, generation otherwise
    max_new_tokens: int = 24
    max_length: int = 384  # tokens per row (prompt + target)
    users_per_step: int = 8
    epochs: int = 2
    batch_size: int = 4
    adapter_epochs: int = 1
    profile_items: int = 10
    # The quick profile's time budget (``bench.budget``): over it, a run cuts its test users, then each
    # test user's training items, then the task adapter's examples. None: no budget. The CLI's quick
    # runs default to 15 minutes.
    budget_minutes: float | None = None
    user_examples: int | None = None  # cap on each test user's training items (a seeded sample)
    left_out: tuple[str, ...] = ()  # methods (run keys) the budget left out: a run fully capped and over

    def full(self) -> BenchConfig:
        return replace(
            self,
            test_users=None,
            adapter_users=None,
            adapter_examples=None,
            budget_minutes=None,
            user_examples=None,
            left_out=(),
        )

    def method_settings(self) -> MethodSettings:
        """The settings the methods read; the setups' fixed choices keep ``MethodSettings``' defaults."""
        shared = {
            name: value for name, value in asdict(self).items() if name in MethodSettings.__dataclass_fields__
        }
        return MethodSettings(**shared)


QUICK = BenchConfig()
QUICK_BUDGET_MINUTES = 15.0  # what `tailorlm bench` gives a quick run unless --budget says otherwise
FULL = QUICK.full()


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
