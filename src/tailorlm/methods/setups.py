"""Which model answers a method's prompts: the bare base, one shared task adapter (OPPU stage 1), a module
per user trained from the bare base (PEFT-U), or a module per user on top of the merged task adapter
(OPPU stage 2). Every setup answers users in mixed batches through the engine."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tailorlm import kinds
from tailorlm.data.schema import Example, User
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.kinds import ModuleSpec
from tailorlm.kinds.lora import LoraSpec
from tailorlm.methods.context import RunContext
from tailorlm.methods.decoding import answer
from tailorlm.methods.recipes import PromptBuilder, Recipe
from tailorlm.store.store import ModuleStore
from tailorlm.train.jobs import train_job
from tailorlm.train.trainer import TrainConfig, UserData

UserAnswers = tuple[User, list[str], float]  # user, one prediction per test example, seconds spent


@dataclass(frozen=True)
class ModuleRecipe:
    """A module kind with the training settings it uses."""

    spec: ModuleSpec
    learning_rate: float


# Every registered kind with its default spec and learning rate. The LoRA rates (per-user and OPPU's) come
# from `tailorlm tune --task verbagg --lrs 1e-3,3e-3,1e-2 --users 12 --epochs 2 --test-users 48`, on
# validation items of users outside the test sample and the task adapter's users (README, "Benchmark
# results"): 1e-2 had the best validation accuracy for both, and the lowest validation loss for OPPU.
# The other kinds' rates are untuned starting points at the usual scale for each kind.
PERSONAL_KINDS: dict[str, ModuleRecipe] = {
    name: ModuleRecipe(kind.spec_type(), kind.learning_rate) for name, kind in kinds.KINDS.items()
}
# OPPU's settings: stage 1 LoRA r8 alpha 8 on q,k,v; stage 2 a fresh r8 alpha 8 LoRA on q,v per user.
TASK_ADAPTER = ModuleRecipe(LoraSpec(rank=8, alpha=8, targets=("q_proj", "k_proj", "v_proj")), 5e-4)
OPPU_PERSONAL = ModuleRecipe(LoraSpec(rank=8, alpha=8, targets=("q_proj", "v_proj")), 1e-2)


def answer_examples(
    ctx: RunContext,
    engine: Engine,
    builder: PromptBuilder,
    queries: Sequence[tuple[User, Example]],
    slots: Sequence[int],
    decoding: str,
) -> list[str]:
    """One answer per (user, example), each row in its slot; calibrated decoding also gets each prompt's
    content-free twin."""
    prompts = [builder(user, example) for user, example in queries]
    content_free = None
    if decoding == "calibrated":
        content_free = [builder(user, example, content_free=True) for user, example in queries]
    return answer(
        engine, ctx.task, prompts, slots, decoding, ctx.config.max_new_tokens, content_free=content_free
    )


def _answer_users(
    ctx: RunContext,
    engine: Engine,
    builder: PromptBuilder,
    users: Sequence[User],
    slot_of: dict[str, int],
    decoding: str,
) -> Iterator[UserAnswers]:
    """Answer every test example of ``users`` in shared batches (each row in its user's slot)."""
    started = time.perf_counter()
    queries = [(user, example) for user in users for example in user.test]
    slots = [slot_of.get(user.id, 0) for user, _ in queries]
    outputs = answer_examples(ctx, engine, builder, queries, slots, decoding)
    seconds = (time.perf_counter() - started) / max(1, len(users))
    position = 0
    for user in users:
        yield user, outputs[position : position + len(user.test)], seconds
        position += len(user.test)


def _groups(users: Sequence[User], size: int) -> Iterator[list[User]]:
    for start in range(0, len(users), size):
        yield list(users[start : start + size])


class BaseSetup:
    """The base model with nothing personal in its weights."""

    def run(
        self, ctx: RunContext, method: str, recipe: Recipe, users: Sequence[User], decoding: str
    ) -> Iterator[UserAnswers]:
        engine = ctx.bare_engine()
        if recipe.profile:
            ctx.ensure_profiles(list(users))
        builder = ctx.builder(recipe, engine.tokenizer)
        for group in _groups(users, 8):
            yield from _answer_users(ctx, engine, builder, group, {}, decoding)


class TaskAdapterSetup:
    """OPPU stage 1: one LoRA trained on the pooled examples of users who are not under test."""

    USER = "task"  # the one "user" of the task adapter's store

    def store(self, ctx: RunContext, recipe: Recipe) -> ModuleStore:
        return ModuleStore(ctx.out_dir / "modules" / f"task-adapter-{recipe.tag}")

    def ensure_trained(self, ctx: RunContext, recipe: Recipe) -> ModuleStore:
        store = self.store(ctx, recipe)
        if store.has(self.USER):
            return store
        if recipe.profile:
            ctx.ensure_profiles(ctx.adapter_users)
        engine = ctx.engine(TASK_ADAPTER.spec, slots=2)
        builder = ctx.builder(recipe, engine.tokenizer)
        train_pairs = [(u, e) for u in ctx.adapter_users for e in ctx.task.training_examples(u)]
        val_pairs = [(u, e) for u in ctx.adapter_users for e in u.val]
        rng = random.Random(ctx.config.seed)
        rng.shuffle(train_pairs)
        rng.shuffle(val_pairs)
        if ctx.config.adapter_examples is not None:
            train_pairs = train_pairs[: ctx.config.adapter_examples]
        val_pairs = val_pairs[:64]
        if not train_pairs:
            raise ValueError(
                f"task {ctx.task.name}: no users outside the test sample to train a task adapter on"
            )
        job = UserData(
            self.USER,
            [(builder(u, e), e.target) for u, e in train_pairs],
            [(builder(u, e), e.target) for u, e in val_pairs],
        )
        config = TrainConfig(
            epochs=ctx.config.adapter_epochs,
            batch_size=8,
            learning_rate=TASK_ADAPTER.learning_rate,
            warmup_ratio=0.1,
            seed=ctx.config.seed,
        )
        ctx.reporter.log(
            f"training the task adapter ({recipe.tag}) on {len(train_pairs)} examples of "
            f"{len(ctx.adapter_users)} other users"
        )
        train_job(
            engine, [job], config, store, on_progress=ctx.reporter.progress(f"task adapter ({recipe.tag})")
        )
        del engine
        ctx.release()
        return store

    def run(
        self, ctx: RunContext, method: str, recipe: Recipe, users: Sequence[User], decoding: str
    ) -> Iterator[UserAnswers]:
        store = self.ensure_trained(ctx, recipe)
        engine = ctx.engine(TASK_ADAPTER.spec, slots=2)
        slots = SlotManager(engine.bank, store.loader(engine.spec))
        if recipe.profile:
            ctx.ensure_profiles(list(users))
        builder = ctx.builder(recipe, engine.tokenizer)
        for group in _groups(users, 8):
            with slots.pinned([self.USER]) as placed:
                slot_of = {u.id: placed[self.USER] for u in group}
                yield from _answer_users(ctx, engine, builder, group, slot_of, decoding)


class PersonalSetup:
    """A module per user, trained on that user's own examples only, many users per step."""

    def __init__(self, recipe: ModuleRecipe, on_task_adapter: bool = False) -> None:
        self.recipe = recipe
        self.on_task_adapter = on_task_adapter

    def build_engine(self, ctx: RunContext, prompt_recipe: Recipe) -> Engine:
        base = ctx.load_base()
        if self.on_task_adapter:
            stored = TaskAdapterSetup().ensure_trained(ctx, prompt_recipe).get(TaskAdapterSetup.USER)
            kinds.of(stored.spec).merge_into_base(stored.spec, base.model, stored.tensors)
        return ctx.engine(self.recipe.spec, slots=ctx.config.users_per_step + 1, base=base)

    def run(
        self, ctx: RunContext, method: str, recipe: Recipe, users: Sequence[User], decoding: str
    ) -> Iterator[UserAnswers]:
        engine = self.build_engine(ctx, recipe)
        if recipe.profile:
            ctx.ensure_profiles(list(users))
        builder = ctx.builder(recipe, engine.tokenizer)
        store = ModuleStore(ctx.out_dir / "modules" / method)
        jobs = [
            UserData(u.id, builder.pairs(u, ctx.task.training_examples(u)), builder.pairs(u, u.val))
            for u in users
        ]
        config = TrainConfig(
            epochs=ctx.config.epochs,
            batch_size=ctx.config.batch_size,
            learning_rate=self.recipe.learning_rate,
            seed=ctx.config.seed,
            users_per_step=ctx.config.users_per_step,
        )
        ctx.reporter.log(
            f"{method}: training {len(jobs)} users' modules, {ctx.config.users_per_step} per step"
        )
        train_job(engine, jobs, config, store, on_progress=ctx.reporter.progress(f"{method}: training"))
        slots = SlotManager(engine.bank, store.loader(engine.spec))
        for group in _groups(users, slots.capacity):
            with slots.pinned([u.id for u in group]) as slot_of:
                yield from _answer_users(ctx, engine, builder, group, slot_of, decoding)
