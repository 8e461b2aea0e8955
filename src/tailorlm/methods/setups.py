"""Which model answers a method's prompts: the bare base, or one shared task adapter (OPPU stage 1); a
module per user, from the bare base (PEFT-U) or on the merged task adapter (OPPU stage 2), is
``personal.PersonalSetup``'s. Also what every setup shares: prompts traced as they are built, the
training job of a user's own data, and the ``Answerer`` that puts users in slots and asks the engine.

A setup is prepared for the users it will be asked about (``prepare`` trains what its module store lacks)
and returns an ``Answerer`` that answers any of their examples in mixed-user batches through the engine.
It reads only what ``MethodDeps`` hands it, so one user's question can be asked outside any benchmark run.
"""

from __future__ import annotations

import contextlib
import gc
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from tailorlm import kinds, models
from tailorlm.data.schema import Example, User
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.kinds import ModuleSpec
from tailorlm.kinds.lora import LoraSpec
from tailorlm.methods.decoding import UserAnswers, answer
from tailorlm.methods.deps import MethodDeps
from tailorlm.methods.recipes import PromptBuilder, PromptUse, Purpose, Recipe
from tailorlm.store.store import ModuleStore
from tailorlm.train.jobs import train_job
from tailorlm.train.trainer import TrainConfig, UserData

Query = tuple[User, Example]


@dataclass(frozen=True)
class ModuleRecipe:
    """A module kind with the training settings it uses."""

    spec: ModuleSpec
    learning_rate: float
    # AdamW's decoupled decay: every step shrinks the module toward zero, i.e. toward the model it sits on
    # (the bare base, or the merged task adapter for OPPU).
    weight_decay: float = 0.0


# Every registered kind with its default spec and learning rate. The LoRA rates (per-user and OPPU's) come
# from `tailorlm tune --task verbagg --lrs 1e-3,3e-3,1e-2 --users 12 --epochs 2 --test-users 48`, on
# validation items of users outside the test sample and the task adapter's users (docs/benchmark-results.md):
# 1e-2 had the best validation accuracy for both, and the lowest validation loss for OPPU.
# The other kinds' rates are untuned starting points at the usual scale for each kind.
PERSONAL_KINDS: dict[str, ModuleRecipe] = {
    name: ModuleRecipe(kind.spec_type(), kind.learning_rate)
    for name, kind in kinds.MODEL_KINDS.items()
    if kind.made_by == "loss"  # a module trained on the user's own examples alone, as PEFT-U's are
}
# OPPU's settings: stage 1 LoRA r8 alpha 8 on q,k,v; stage 2 a fresh r8 alpha 8 LoRA on q,v per user.
TASK_ADAPTER = ModuleRecipe(LoraSpec(rank=8, alpha=8, targets=("q_proj", "k_proj", "v_proj")), 5e-4)
OPPU_PERSONAL = ModuleRecipe(LoraSpec(rank=8, alpha=8, targets=("q_proj", "v_proj")), 1e-2)
# OPPU with shrinkage: the same module pulled toward the task adapter by weight decay, 1% per step at this
# rate (lr x decay), so about a fifth over a quick run's 20 steps. An untuned starting point.
OPPU_SHRUNK = ModuleRecipe(OPPU_PERSONAL.spec, OPPU_PERSONAL.learning_rate, weight_decay=1.0)


def prompts_for(
    deps: MethodDeps,
    builder: PromptBuilder,
    method: str,
    purpose: Purpose,
    queries: Sequence[Query],
    module: str | None = None,
    content_free: bool = False,
) -> list[str]:
    """The prompts of ``queries``, each recorded in ``deps.trace`` with what it is for: every prompt a
    setup runs or trains on comes through here, so the trace holds all of them."""
    texts = []
    for user, example in queries:
        prompt = builder.build(user, example, content_free=content_free)
        deps.record(PromptUse(method, purpose, module, prompt.provenance))
        texts.append(prompt.text)
    return texts


def training_job(
    deps: MethodDeps,
    builder: PromptBuilder,
    method: str,
    module: str,
    train: Sequence[Query],
    val: Sequence[Query] = (),
) -> UserData:
    """The training job of ``module`` (a user id, or the task adapter's): (prompt, target) pairs of its
    train and validation queries, every prompt recorded as trace use ``train`` or ``validate``."""
    train_texts = prompts_for(deps, builder, method, "train", train, module)
    val_texts = prompts_for(deps, builder, method, "validate", val, module)
    return UserData(
        module,
        [(text, e.target) for text, (_, e) in zip(train_texts, train, strict=True)],
        [(text, e.target) for text, (_, e) in zip(val_texts, val, strict=True)],
    )


def personal_job(deps: MethodDeps, builder: PromptBuilder, method: str, user: User) -> UserData:
    """A user's own module's job: their training examples (as the task lets them be trained on) and
    their validation items, and nothing of any other user."""
    return training_job(
        deps,
        builder,
        method,
        user.id,
        [(user, e) for e in deps.task.training_examples(user)],
        [(user, e) for e in user.val],
    )


def answer_examples(
    deps: MethodDeps,
    method: str,
    engine: Engine,
    builder: PromptBuilder,
    queries: Sequence[Query],
    slots: Sequence[int],
    decoding: str,
) -> list[str]:
    """One answer per (user, example), each row in its slot; calibrated decoding also gets each prompt's
    content-free twin."""
    prompts = prompts_for(deps, builder, method, "answer", queries)
    content_free = None
    if decoding == "calibrated":
        content_free = prompts_for(deps, builder, method, "answer", queries, content_free=True)
    return answer(
        engine,
        deps.task,
        prompts,
        slots,
        decoding,
        deps.settings.max_new_tokens,
        content_free=content_free,
    )


def _groups(users: Sequence[User], size: int) -> Iterator[list[User]]:
    for start in range(0, len(users), size):
        yield list(users[start : start + size])


@dataclass
class Answerer:
    """A prepared setup: its engine and prompt builder, and where each user's rows go. ``slots`` is
    ``None`` when the bare base answers (every row in slot 0); ``shared`` names the one module every user
    is answered with (the task adapter), otherwise each user gets their own. ``group_size`` users are
    placed and answered at a time."""

    deps: MethodDeps
    method: str
    engine: Engine
    builder: PromptBuilder
    group_size: int
    slots: SlotManager | None = None
    shared: str | None = None

    @contextlib.contextmanager
    def placed(self, users: Sequence[User]) -> Iterator[dict[str, int]]:
        """Each user's slot, kept resident until the block ends."""
        if self.slots is None:
            yield {}
        elif self.shared is not None:
            with self.slots.pinned([self.shared]) as placed:
                yield {u.id: placed[self.shared] for u in users}
        else:
            with self.slots.pinned([u.id for u in users]) as placed:
                yield placed

    def answer(self, queries: Sequence[Query], decoding: str) -> list[str]:
        """One answer per (user, example), in order; users are placed ``group_size`` at a time."""
        answers: list[str] = [""] * len(queries)
        users = list({user.id: user for user, _ in queries}.values())
        for group in _groups(users, self.group_size):
            ids = {u.id for u in group}
            rows = [i for i, (user, _) in enumerate(queries) if user.id in ids]
            with self.placed(group) as slot_of:
                outputs = answer_examples(
                    self.deps,
                    self.method,
                    self.engine,
                    self.builder,
                    [queries[i] for i in rows],
                    [slot_of.get(queries[i][0].id, 0) for i in rows],
                    decoding,
                )
            for i, output in zip(rows, outputs, strict=True):
                answers[i] = output
        return answers


def answer_users(answerer: Answerer, users: Sequence[User], decoding: str) -> Iterator[UserAnswers]:
    """Every test example of ``users``, ``answerer.group_size`` users per call, each user yielded as soon
    as their group is answered (with the group's seconds split evenly)."""
    for group in _groups(users, answerer.group_size):
        started = time.perf_counter()
        outputs = answerer.answer([(user, example) for user in group for example in user.test], decoding)
        seconds = (time.perf_counter() - started) / max(1, len(group))
        position = 0
        for user in group:
            yield user, outputs[position : position + len(user.test)], seconds
            position += len(user.test)


class Setup(Protocol):
    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> Answerer:
        """Train whatever ``users`` need that the store lacks; return an answerer for them."""


def refuse_adapter_users(deps: MethodDeps, users: Sequence[User]) -> None:
    """The task adapter is non-personal: a user it trained on must not be answered through it."""
    trained_on = {u.id for u in deps.adapter_users}
    overlap = sorted(u.id for u in users if u.id in trained_on)
    if overlap:
        raise ValueError(
            f"task {deps.task.name}: the task adapter trains on {len(overlap)} of the users it is asked "
            f"about ({', '.join(overlap[:3])}); adapter users must be other users"
        )


class BaseSetup:
    """The base model with nothing personal in its weights."""

    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> Answerer:
        engine = deps.bare_engine()
        if recipe.profile:
            deps.profiles.ensure(users)
        builder = deps.builder(recipe, engine.tokenizer)
        return Answerer(deps, method, engine, builder, group_size=deps.settings.answer_group)


class TaskAdapterSetup:
    """OPPU stage 1: one LoRA trained on the pooled examples of ``deps.adapter_users``."""

    USER = "task"  # the one "user" of the task adapter's store
    STORE = "task-adapter"  # its store's name, before the recipe's tag

    @classmethod
    def store_name(cls, recipe: Recipe) -> str:
        return f"{cls.STORE}-{recipe.tag}"

    def ensure_trained(self, deps: MethodDeps, recipe: Recipe) -> ModuleStore:
        store = deps.store(self.store_name(recipe))
        if store.has(self.USER):
            return store
        if recipe.profile:
            deps.profiles.ensure(deps.adapter_users)
        train_pairs, val_pairs = self.pooled(deps)
        self.train(deps, recipe, store, train_pairs, val_pairs)
        # The training engine's base copy is not needed again: free it before the next one is loaded.
        gc.collect()
        return store

    @staticmethod
    def pooled(deps: MethodDeps) -> tuple[list[Query], list[Query]]:
        """The shared model's (train, validation) queries: ``deps.adapter_users``' examples pooled and
        shuffled, the training ones capped at ``adapter_examples``."""
        settings = deps.settings
        train_pairs = [(u, e) for u in deps.adapter_users for e in deps.task.training_examples(u)]
        val_pairs = [(u, e) for u in deps.adapter_users for e in u.val]
        rng = random.Random(settings.seed)
        rng.shuffle(train_pairs)
        rng.shuffle(val_pairs)
        if settings.adapter_examples is not None:
            train_pairs = train_pairs[: settings.adapter_examples]
        val_pairs = val_pairs[: settings.adapter_val_examples]
        if not train_pairs:
            raise ValueError(
                f"task {deps.task.name}: no users to train a task adapter on "
                "(it needs users other than the ones it is asked about)"
            )
        return train_pairs, val_pairs

    @staticmethod
    def train_config(deps: MethodDeps) -> TrainConfig:
        settings = deps.settings
        return TrainConfig(
            epochs=settings.adapter_epochs,
            batch_size=settings.adapter_batch_size,
            learning_rate=TASK_ADAPTER.learning_rate,
            warmup_ratio=settings.adapter_warmup_ratio,
            seed=settings.seed,
        )

    def train(
        self, deps: MethodDeps, recipe: Recipe, store: ModuleStore, train: list[Query], val: list[Query]
    ) -> None:
        """Train the shared module on ``train`` (best epoch by ``val``) and store it as ``USER``."""
        engine = deps.engine(TASK_ADAPTER.spec, slots=2)
        builder = deps.builder(recipe, engine.tokenizer)
        job = training_job(deps, builder, self.store_name(recipe), self.USER, train, val)
        config = self.train_config(deps)
        deps.reporter.log(
            f"training the task adapter ({recipe.tag}) on {len(train)} examples of "
            f"{len(deps.adapter_users)} other users"
        )
        train_job(
            engine, [job], config, store, on_progress=deps.reporter.progress(f"task adapter ({recipe.tag})")
        )

    def merged_base(self, deps: MethodDeps, recipe: Recipe) -> models.BaseModel:
        """A fresh base model with the task adapter (trained first if missing) folded into its weights."""
        base = deps.load_base()
        stored = self.ensure_trained(deps, recipe).get(self.USER)
        kinds.of(stored.spec).merge_into_base(stored.spec, base.model, stored.tensors)
        return base

    def answerer(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> Answerer:
        """The answerer of ``prepare``, under the name the label setups give theirs."""
        return self.prepare(deps, method, recipe, users)

    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> Answerer:
        refuse_adapter_users(deps, users)
        store = self.ensure_trained(deps, recipe)
        engine = deps.engine(TASK_ADAPTER.spec, slots=2)
        slots = SlotManager(engine.bank, store.loader(engine.spec))
        if recipe.profile:
            deps.profiles.ensure(users)
        builder = deps.builder(recipe, engine.tokenizer)
        return Answerer(
            deps, method, engine, builder, deps.settings.answer_group, slots=slots, shared=self.USER
        )
