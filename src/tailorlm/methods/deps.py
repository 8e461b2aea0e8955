"""What a method needs to answer users, handed to it explicitly: the task, a base-model loader, where its
modules are stored, retrievers, a profile source, its settings, a reporter and an optional prompt trace.

Nothing here knows about a benchmark run. The benchmark builds one of these from its config and run folder
(``tailorlm.bench.config``); a server or a notebook builds its own to ask one user one question.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path

from tailorlm import models
from tailorlm.data.schema import Task, User
from tailorlm.engine.engine import Engine
from tailorlm.kinds import ModuleSpec
from tailorlm.kinds.lora import LoraSpec
from tailorlm.methods.profiles import Profiles, ProfileSource
from tailorlm.methods.recipes import PromptBuilder, PromptTrace, PromptUse, Recipe
from tailorlm.methods.retrieval import Retriever, RetrieverCache
from tailorlm.progress import Reporter
from tailorlm.store.store import ModuleStore
from tailorlm.train.jobs import LocalRunner, TrainRunner

BaseLoader = Callable[[], models.BaseModel]  # a fresh base model per call (setups merge into their copy)


def base_loader(name: str | None, device: str | None = None, dtype: str | None = None) -> BaseLoader:
    """A loader of the base model ``name`` (``None``: the default model, ``models.TINY_MODEL``: tiny) on
    ``device`` in ``dtype`` (``tailorlm.device``)."""
    return functools.partial(models.load_base, name, device=device, dtype=dtype)


@dataclass(frozen=True)
class MethodSettings:
    """How methods train and answer. The defaults are the benchmark's quick profile; the last group are
    fixed choices of the setups, named here so that each has one place and a reason."""

    seed: int = 0
    k: int = 3  # retrieved history items per prompt
    max_new_tokens: int = 24  # generation tasks: one line of answer
    max_length: int = 384  # tokens per row (prompt + target)
    users_per_step: int = 8  # users trained together per optimizer step (the engine holds one more slot)
    epochs: int = 2  # epochs of each per-user module (the best by validation loss is kept)
    batch_size: int = 4  # rows of one user per step of a per-user module
    profile_items: int = 10  # history items a PAG profile is written from
    adapter_epochs: int = 1  # epochs of the task adapter
    adapter_examples: int | None = 256  # cap on the task adapter's training examples; None: all of them

    # Users whose test items go to the engine in one call when the users share one model (the bare base
    # or the task adapter): each call's answers are kept before the next starts, so an interrupted run
    # loses at most this many users, and 8 users of verbagg (2 test items each) fill one scoring batch.
    answer_group: int = 8
    # Validation examples the task adapter picks its best epoch on: a quarter of its default 256
    # training examples, so validating after each epoch costs little next to the epoch itself.
    adapter_val_examples: int = 64
    # The task adapter is one "user" whose examples are pooled from many users: twice a personal module's
    # batch averages each step over more of them, and still makes 32 steps per epoch of 256 examples.
    adapter_batch_size: int = 8
    # The adapter starts from zero on pooled data; ramping its learning rate up over the first tenth of
    # its steps (the usual fine-tuning warm-up) keeps the first, noisiest updates small.
    adapter_warmup_ratio: float = 0.1
    # A PAG profile is two short sentences (``profiles.PROFILE_INSTRUCTION``); 60 tokens hold them.
    profile_tokens: int = 60


@dataclass
class MethodDeps:
    """Everything a setup or baseline reads besides the users it is asked about.

    ``modules`` is the root under which each setup keeps its ``ModuleStore`` (one folder per method, one
    per task-adapter recipe), so a setup trains only the users that root lacks. ``adapter_users`` train
    the shared task adapter; they must not be users the adapter is then asked about. ``profiles`` defaults
    to profiles written by the bare base model, kept in memory and in ``profile_cache`` when given.
    ``trace``, when given, receives every prompt a setup builds with what went into it. ``runner``
    decides where per-user modules train (default: this process; ``cluster.training.RayRunner``: Ray).
    """

    task: Task
    load_base: BaseLoader
    modules: Path
    settings: MethodSettings = field(default_factory=MethodSettings)
    adapter_users: Sequence[User] = ()
    retrievers: Callable[[str], Retriever] = field(default_factory=RetrieverCache)
    profiles: ProfileSource | None = None
    reporter: Reporter = field(default_factory=Reporter)
    trace: PromptTrace | None = None
    runner: TrainRunner = field(default_factory=LocalRunner)
    profile_cache: InitVar[Path | None] = None
    _bare: Engine | None = field(default=None, init=False, repr=False)

    def __post_init__(self, profile_cache: Path | None) -> None:
        self.modules = Path(self.modules)
        if self.profiles is None:
            self.profiles = Profiles(
                self.task,
                self.bare_engine,
                profile_cache,
                items=self.settings.profile_items,
                seed=self.settings.seed,
                max_new_tokens=self.settings.profile_tokens,
                progress=self.reporter.progress,
            )

    def bare_engine(self) -> Engine:
        """The base model alone (every row in slot 0), built once and shared by prompt-side methods and
        profile writing."""
        if self._bare is None:
            self._bare = self.engine(LoraSpec(), slots=2)
        return self._bare

    def engine(self, spec: ModuleSpec, slots: int, base: models.BaseModel | None = None) -> Engine:
        """An engine of ``slots`` slots for ``spec`` on ``base`` (default: a freshly loaded base)."""
        return Engine(base or self.load_base(), spec, slots=slots, max_length=self.settings.max_length)

    def store(self, name: str) -> ModuleStore:
        """The module store a setup keeps under ``name``."""
        return ModuleStore(self.modules / name)

    def builder(self, recipe: Recipe, tokenizer: object) -> PromptBuilder:
        retriever = self.retrievers(recipe.retrieval) if recipe.retrieval else None
        return PromptBuilder(
            self.task,
            tokenizer,
            recipe,
            k=self.settings.k,
            retriever=retriever,
            profiles=self.profiles,
            seed=self.settings.seed,
        )

    def record(self, use: PromptUse) -> None:
        if self.trace is not None:
            self.trace(use)
