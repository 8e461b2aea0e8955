"""How long a benchmark run will take, said before it starts, and the caps that fit a quick run into a
time budget whatever the task.

The work of a run is counted in items: training rows (a per-user module's examples times its epochs, the
task adapter's examples), scored items (a label task's question with all its labels; validation items
each epoch), generated answers and written profiles. Each kind of item is timed once on this machine with
this base model (``measure``: real prompts of the task, a few seconds), so the estimate follows the
task's prompt and label lengths, the model and the device. Prompts that carry retrieved items, shots or a
profile are longer than the plain prompts measured: their items count in proportion to their tokens.

When the estimate is over the budget, the run is capped, in this order: each test user's training items
(a seeded sample, the same for every method, baselines included, so methods stay comparable), then the
number of test users. The caps go into the run's config, so the report shows them and a resumed run
keeps them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tailorlm.bench.config import BenchConfig
from tailorlm.data.schema import Task, User
from tailorlm.engine.batch import Row
from tailorlm.engine.engine import Engine
from tailorlm.engine.generation import DecodeConfig
from tailorlm.methods import label_models
from tailorlm.methods.deps import MethodDeps
from tailorlm.methods.personal import PersonalSetup
from tailorlm.methods.recipes import PromptBuilder, Recipe
from tailorlm.methods.registry import Method
from tailorlm.methods.setups import TASK_ADAPTER, BaseSetup, TaskAdapterSetup

# Caps tried on each test user's training items, largest first; and the fewest test users a capped run
# keeps (below this the confidence intervals say little).
USER_ITEM_CAPS = (96, 64, 48, 32, 24, 16)
MIN_TEST_USERS = 8
METHOD_OVERHEAD_S = 4.0  # loading a base model and building an engine, per method that uses one


@dataclass(frozen=True)
class Rates:
    """Seconds per item on this machine: a training row (forward and backward, in a mixed-user batch),
    a scored question (all its labels), a generated answer; and plain prompt tokens per item."""

    train_s: float
    score_s: float
    generate_s: float
    prompt_tokens: float
    item_tokens: float  # a history item's text and target, as retrieval and shots show it


@dataclass
class Work:
    """Items of each kind a part of the run processes, in plain-prompt equivalents."""

    train: float = 0.0
    score: float = 0.0
    generate: float = 0.0
    engines: int = 0

    def seconds(self, rates: Rates) -> float:
        return (
            self.train * rates.train_s
            + self.score * rates.score_s
            + self.generate * rates.generate_s
            + self.engines * METHOD_OVERHEAD_S
        )

    def add(self, other: Work) -> None:
        self.train += other.train
        self.score += other.score
        self.generate += other.generate
        self.engines += other.engines


@dataclass(frozen=True)
class Estimate:
    seconds: float
    per_method: dict[str, float]
    rates: Rates

    def lines(self) -> list[str]:
        parts = ", ".join(f"{name} {s / 60:.1f}" for name, s in self.per_method.items() if s >= 30)
        return [
            f"estimated {self.seconds / 60:.1f} min on this machine" + (f" (min: {parts})" if parts else "")
        ]


# ---- measuring ----------------------------------------------------------------------------------------


def _sample_rows(
    task: Task, users: Sequence[User], per_user: int, count: int, seed: int
) -> list[tuple[User, object]]:
    """``per_user`` training items of each of ``count`` seeded users: the shape of a training step (a
    user's rows share their prompt's start, which the engine runs once) and of answering a user."""
    pool = [u for u in users if len(task.training_examples(u)) >= per_user] or list(users)
    chosen = random.Random(seed).sample(pool, min(count, len(pool)))
    return [(u, e) for u in chosen for e in task.training_examples(u)[:per_user]]


def _timed(work, repeats: int = 2) -> float:
    """Seconds per call of ``work`` after one call that pays one-off costs (allocations, kernel choice)."""
    work()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - started) / repeats


def measure(deps: MethodDeps, users: Sequence[User]) -> Rates:
    """Time a training step, a scoring call and (generation tasks) a generation call on real plain
    prompts of ``users`` (a batch as the trainer builds one: a few users, several rows each), on a fresh
    base model with a LoRA bank."""
    task, settings = deps.task, deps.settings
    queries = _sample_rows(task, users, settings.batch_size, 2, settings.seed)
    if not queries:
        raise ValueError(f"task {task.name}: no training items to measure the work on")
    engine = Engine(deps.load_base(), TASK_ADAPTER.spec, slots=3, max_length=settings.max_length)
    builder = PromptBuilder(task, engine.tokenizer, Recipe())
    slot_of = {user.id: i + 1 for i, user in enumerate({u.id: u for u, _ in queries}.values())}
    prompts = [builder.build(u, e).text for u, e in queries]
    slots = [slot_of[u.id] for u, _ in queries]
    rows = [Row(p, e.target, s) for p, (_, e), s in zip(prompts, queries, slots, strict=True)]
    encoded = engine.encode(rows)

    def step() -> None:
        with engine.training():
            sums, _ = engine.token_nll(encoded)
            sums.sum().backward()

    train_s = _timed(step) / len(rows)
    if task.labels is not None:
        score_s = _timed(lambda: engine.score_labels(prompts, slots, task.labels)) / len(rows)
    else:
        score_s = _timed(lambda: engine.score(rows)) / len(rows)
    generate_s = score_s
    if task.labels is None:
        decode = DecodeConfig(max_new_tokens=settings.max_new_tokens)
        generate_s = _timed(lambda: engine.generate(prompts, slots, decode), repeats=1) / len(rows)
    tokens = [len(engine.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    items = [
        engine.tokenizer(f"{e.text} {e.target}", add_special_tokens=False)["input_ids"] for _, e in queries
    ]
    return Rates(train_s, score_s, generate_s, sum(tokens) / len(tokens), sum(map(len, items)) / len(items))


# ---- counting ------------------------------------------------------------------------------------------


def _length(recipe: Recipe, rates: Rates, settings) -> float:
    """A recipe's prompt length over the plain prompt's."""
    extra = 0.0
    if recipe.retrieval:
        extra += settings.k * rates.item_tokens
    if recipe.shots:
        extra += 3 * rates.item_tokens
    if recipe.profile:
        extra += settings.profile_tokens
    return (rates.prompt_tokens + extra) / rates.prompt_tokens


def _answers(task: Task, users: Sequence[User], factor: float) -> Work:
    items = sum(len(u.test) for u in users) * factor
    return Work(generate=items) if task.labels is None else Work(score=items)


def _training(task: Task, users: Sequence[User], epochs: int, factor: float, cap: int | None) -> Work:
    rows = sum(min(len(task.training_examples(u)), cap or 10**9) for u in users)
    val = sum(len(u.val) for u in users)
    return Work(train=rows * epochs * factor, score=val * epochs * factor)


def method_work(
    method: Method,
    task: Task,
    users: Sequence[User],
    adapter_users: Sequence[User],
    config: BenchConfig,
    rates: Rates,
    counted: set[str],
) -> Work:
    """The items ``method`` processes for ``users``; shared parts (a task adapter, profiles, a module
    store two methods use) count once, the first time, by their key in ``counted``."""
    setup, recipe, settings = method.setup, method.recipe, config.method_settings()
    work = Work()
    if setup is None:
        return work
    factor = _length(recipe, rates, settings)
    work.engines = 1

    def once(key: str, part: Work) -> None:
        if key not in counted:
            counted.add(key)
            work.add(part)

    def adapter(shared: TaskAdapterSetup) -> None:
        """The shared model's training; the joint one scores every label of an example with gradients,
        counted as one training example (a label's few tokens continue from the prompt's cache)."""
        pooled = sum(len(task.training_examples(u)) for u in adapter_users)
        examples = min(pooled, config.adapter_examples or pooled)
        key = f"{shared.STORE}:{recipe.tag}"
        once(key, Work(train=examples * config.adapter_epochs * factor, engines=1))

    def personal(key: str) -> None:
        once(key, _training(task, users, config.epochs, factor, config.user_examples))

    if recipe.profile:
        once("profiles", Work(generate=len(users) * settings.profile_tokens / settings.max_new_tokens))
    if isinstance(setup, BaseSetup):
        work.add(_answers(task, users, factor))
    elif isinstance(setup, TaskAdapterSetup):
        adapter(setup)
        work.add(_answers(task, users, factor))
    elif isinstance(setup, PersonalSetup):
        if setup.on_task_adapter:
            adapter(TaskAdapterSetup())
        personal(f"personal:{method.name}")
        work.add(_answers(task, users, factor))
    elif isinstance(setup, label_models.BiasSetup | label_models.FusionSetup | label_models.SelectSetup):
        # Fusion and oppu-select stand on the plain task adapter and its biases (``BiasSetup()``).
        biased = setup if isinstance(setup, label_models.BiasSetup) else label_models.BiasSetup()
        adapter(biased.shared)
        fit = sum(min(len(task.training_examples(u)), config.user_examples or 10**9) for u in users)
        val = sum(len(u.val) for u in users)
        once(f"biases:{biased.store}:{recipe.tag}", Work(score=fit + val))
        if isinstance(setup, label_models.SelectSetup):
            personal(f"personal:{setup.MODULE_METHOD}")
            work.add(Work(score=2 * val))
        work.add(_answers(task, users, factor))
    else:  # a setup this estimate does not know: count its answers at least
        work.add(_answers(task, users, factor))
    return work


def estimate(
    methods: Sequence[Method],
    task: Task,
    users: Sequence[User],
    adapter_users: Sequence[User],
    config: BenchConfig,
    rates: Rates,
) -> Estimate:
    counted: set[str] = set()
    per_method = {
        m.name: method_work(m, task, users, adapter_users, config, rates, counted).seconds(rates)
        for m in methods
    }
    return Estimate(sum(per_method.values()), per_method, rates)


def fit_budget(
    methods: Sequence[Method],
    task: Task,
    users: Sequence[User],
    adapter_users: Sequence[User],
    config: BenchConfig,
    rates: Rates,
) -> tuple[BenchConfig, Estimate]:
    """``config`` with the loosest caps whose estimate fits ``config.budget_minutes`` (per-user training
    items first, then test users, never below ``MIN_TEST_USERS``), and that estimate. A run that fits
    as it is keeps its config."""
    budget = config.budget_minutes * 60 if config.budget_minutes else None
    current = estimate(methods, task, users, adapter_users, config, rates)
    if budget is None or current.seconds <= budget:
        return config, current
    largest = max((len(task.training_examples(u)) for u in users), default=0)
    for cap in (c for c in USER_ITEM_CAPS if c < largest):
        capped = replace(config, user_examples=cap)
        current = estimate(methods, task, users, adapter_users, capped, rates)
        if current.seconds <= budget:
            return capped, current
    config = capped if largest > USER_ITEM_CAPS[-1] else config
    count = len(users)
    while count > MIN_TEST_USERS and current.seconds > budget:
        count = max(MIN_TEST_USERS, int(count * budget / current.seconds))
        current = estimate(methods, task, users[:count], adapter_users, config, rates)
        if count == MIN_TEST_USERS:
            break
    return replace(config, test_users=count), current


def cap_training_items(task: Task, users: Sequence[User], cap: int | None, seed: int) -> None:
    """Keep at most ``cap`` of each user's training items (a seeded sample, in their order), in place:
    every method, the baselines too, then sees the same items."""
    if cap is None:
        return
    for user in users:
        if len(user.train) > cap:
            keep = set(random.Random(f"{seed}:{user.id}").sample(range(len(user.train)), cap))
            user.train = [e for i, e in enumerate(user.train) if i in keep]
