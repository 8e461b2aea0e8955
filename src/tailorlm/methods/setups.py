"""Which model answers a method's prompts: the bare base, one shared task adapter (OPPU stage 1), a module
per user trained from the bare base (PEFT-U), or a module per user on top of the merged task adapter
(OPPU stage 2). Every setup answers users in mixed batches through the engine."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tailorlm import console
from tailorlm.data.schema import Example, User
from tailorlm.engine import io, train
from tailorlm.engine.bank import merge_lora_into_base
from tailorlm.engine.core import Engine
from tailorlm.engine.modules import BottleneckSpec, IA3Spec, LoraSpec, ModuleSpec, PromptSpec
from tailorlm.engine.train import TrainConfig, UserData
from tailorlm.methods.context import RunContext
from tailorlm.methods.decoding import answer
from tailorlm.methods.recipes import PromptBuilder, Recipe

UserAnswers = tuple[User, list[str], float]  # user, one prediction per test example, seconds spent


@dataclass(frozen=True)
class ModuleRecipe:
    """A module kind with the training settings it uses."""

    spec: ModuleSpec
    learning_rate: float


# LoRA learning rates (per-user and OPPU's) come from `tailorlm tune --task verbagg --lrs 1e-3,3e-3,1e-2
# --users 12 --epochs 2 --test-users 48`, on validation items of users outside the test sample and the
# task adapter's users (README, "Benchmark results"). 1e-2 had the best validation accuracy for both,
# and the lowest validation loss for OPPU. IA3, prompt tuning and bottleneck rates are untuned starting
# points at the usual scale for each kind.
PERSONAL_KINDS: dict[str, ModuleRecipe] = {
    "lora": ModuleRecipe(LoraSpec(rank=8, alpha=16, targets=("q_proj", "v_proj")), 1e-2),
    "ia3": ModuleRecipe(IA3Spec(), 1e-2),
    "prompt": ModuleRecipe(PromptSpec(virtual_tokens=16), 3e-2),
    "bottleneck": ModuleRecipe(BottleneckSpec(placement="houlsby", reduction_factor=16), 1e-3),
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

    def folder(self, ctx: RunContext, recipe: Recipe) -> Path:
        return ctx.out_dir / "modules" / f"task-adapter-{recipe.tag}"

    def ensure_trained(self, ctx: RunContext, recipe: Recipe) -> Path:
        root = self.folder(ctx, recipe)
        if train.is_trained(root, "task"):
            return train.user_folder(root, "task")
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
            "task",
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
        console.err.print(
            f"training the task adapter ({recipe.tag}) on {len(train_pairs)} examples of "
            f"{len(ctx.adapter_users)} other users"
        )
        train.train_job(engine, [job], config, root, progress=True)
        del engine
        ctx.release()
        return train.user_folder(root, "task")

    def run(
        self, ctx: RunContext, method: str, recipe: Recipe, users: Sequence[User], decoding: str
    ) -> Iterator[UserAnswers]:
        folder = self.ensure_trained(ctx, recipe)
        engine = ctx.engine(TASK_ADAPTER.spec, slots=2)
        io.load_module(engine, 1, folder)
        if recipe.profile:
            ctx.ensure_profiles(list(users))
        builder = ctx.builder(recipe, engine.tokenizer)
        for group in _groups(users, 8):
            yield from _answer_users(ctx, engine, builder, group, {u.id: 1 for u in group}, decoding)


class PersonalSetup:
    """A module per user, trained on that user's own examples only, many users per step."""

    def __init__(self, recipe: ModuleRecipe, on_task_adapter: bool = False) -> None:
        self.recipe = recipe
        self.on_task_adapter = on_task_adapter

    def build_engine(self, ctx: RunContext, prompt_recipe: Recipe) -> Engine:
        base = ctx.load_base()
        if self.on_task_adapter:
            stored = io.read_module(TaskAdapterSetup().ensure_trained(ctx, prompt_recipe))
            merge_lora_into_base(base.model, stored.spec, stored.tensors)
        return ctx.engine(self.recipe.spec, slots=ctx.config.users_per_step + 1, base=base)

    def run(
        self, ctx: RunContext, method: str, recipe: Recipe, users: Sequence[User], decoding: str
    ) -> Iterator[UserAnswers]:
        engine = self.build_engine(ctx, recipe)
        if recipe.profile:
            ctx.ensure_profiles(list(users))
        builder = ctx.builder(recipe, engine.tokenizer)
        root = ctx.out_dir / "modules" / method
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
        console.err.print(
            f"{method}: training {len(jobs)} users' modules, {ctx.config.users_per_step} per step"
        )
        folders = train.train_job(engine, jobs, config, root, progress=True)
        for group in _groups(users, ctx.config.users_per_step):
            slot_of = {}
            for slot, user in enumerate(group, start=1):
                io.load_module(engine, slot, folders[user.id])
                slot_of[user.id] = slot
            yield from _answer_users(ctx, engine, builder, group, slot_of, decoding)
