"""Training many users' modules at once.

Each step concatenates the next mini-batch of every user in the bank into one batch, so the frozen base
model runs once for all of them. Each user's loss is the mean over their own target tokens, and the
users' tensors are disjoint slots, so a user's gradient is exactly the one they would get training
alone. The optimizer keeps per-slot moments, step counts, learning-rate schedules and gradient-norm
clipping, and a user's mini-batch order depends only on (seed, user id, epoch): training a user in any
group gives the module training them alone gives, up to float rounding.

When a user finishes (epochs done, or early stop on their own validation loss) their best module is
handed back and their slot goes to the next user in the queue.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tailorlm.engine.bank import EngineError
from tailorlm.engine.batch import IGNORE
from tailorlm.engine.engine import Engine, Row
from tailorlm.engine.slots import SlotManager
from tailorlm.progress import ProgressCallback
from tailorlm.train.optimizer import SlotAdamW, linear_schedule


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    learning_rate: float = 1e-4
    batch_size: int = 4  # rows of one user per step
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    patience: int | None = None  # epochs without validation improvement before a user stops early
    seed: int = 0
    users_per_step: int | None = None  # default: every user slot of the bank
    micro_batch_rows: int = 16  # rows per forward/backward pass within one step
    # Padded tokens per pass (rows x its longest row): long rows make a pass's activations outgrow the
    # caches, so a pass of 16 LaMP-5 rows of ~380 tokens ran 1.7-2.4 s a row against 1.1 in passes of 4;
    # verbagg's 16 rows of ~85 tokens stay one pass (``pass_ranges``).
    micro_batch_tokens: int = 1536
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise EngineError("training needs epochs >= 1, batch_size >= 1 and a positive learning rate")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise EngineError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def batches(self, rows: int) -> int:
        """Mini-batches per epoch of a user with ``rows`` training examples."""
        return math.ceil(rows / self.batch_size)

    def steps(self, rows: int) -> int:
        """Optimizer steps of a user with ``rows`` training examples, every epoch."""
        return self.batches(rows) * self.epochs


@dataclass
class UserData:
    """One user's training job: (prompt, target) pairs, optional validation pairs, optional start module."""

    user_id: str
    train: Sequence[tuple[str, str]]
    val: Sequence[tuple[str, str]] = ()
    init: dict[str, torch.Tensor] | None = None


@dataclass
class UserResult:
    user_id: str
    module: dict[str, torch.Tensor]
    steps: int
    epochs_run: int
    best_epoch: int | None
    train_losses: list[float]  # mean token loss per epoch
    val_losses: list[float]
    seconds: float

    def meta(self) -> dict:
        return {
            "user": self.user_id,
            "steps": self.steps,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "train_losses": self.train_losses,
            "val_losses": self.val_losses,
            "train_seconds": self.seconds,
        }


def seed_for(*parts: object) -> int:
    """A seed that depends only on its parts (seed, user id, epoch or "init"), never on the group."""
    return zlib.crc32(":".join(str(p) for p in parts).encode())


def epoch_batches(config: TrainConfig, key: str, rows: int, epoch: int) -> list[list[int]]:
    """One epoch's mini-batches over ``rows`` examples: a permutation that depends only on (seed, ``key``,
    epoch), cut into batches of ``config.batch_size``."""
    generator = torch.Generator().manual_seed(seed_for(config.seed, key, epoch))
    order = torch.randperm(rows, generator=generator).tolist()
    return [order[i : i + config.batch_size] for i in range(0, rows, config.batch_size)]


def pass_ranges(batches: Sequence[Sequence[int]], max_rows: int, max_tokens: int) -> list[tuple[int, int]]:
    """The forward/backward passes of one step, as [start, end) ranges of its rows (the users' batches
    one after another; ``batches``: each batch's row lengths in tokens). Whole batches share a pass while
    it stays within ``max_rows`` rows and ``max_tokens`` padded tokens (rows x the longest); a batch over
    either limit alone is cut into passes of its own rows (a row over the token limit is a pass alone)."""
    passes: list[tuple[int, int]] = []
    start = position = longest = 0
    for lengths in batches:
        rows, widest = len(lengths), max(lengths, default=0)
        grown = position - start + rows
        if position > start and (grown > max_rows or grown * max(longest, widest) > max_tokens):
            passes.append((start, position))
            start, longest = position, 0
        if position == start and (rows > max_rows or rows * widest > max_tokens):
            first = 0
            while first < rows:  # a greedy cut of this batch alone
                last, top = first + 1, lengths[first]
                while last < rows and last + 1 - first <= max_rows:
                    if (last + 1 - first) * max(top, lengths[last]) > max_tokens:
                        break
                    top = max(top, lengths[last])
                    last += 1
                passes.append((position + first, position + last))
                first = last
            position += rows
            start = position
            continue
        position += rows
        longest = max(longest, widest)
    if position > start:
        passes.append((start, position))
    return passes


def planned_passes(config: TrainConfig, width: int, rows: Sequence[int], row_tokens: int = 0) -> list[int]:
    """Rows of every forward/backward pass ``MultiUserTrainer.run`` makes for users with ``rows`` training
    examples each (in queue order), ``width`` of them at a time, when nobody stops early and every row is
    ``row_tokens`` long. The work estimate counts a run's training from it: a user with many rows ends in
    steps of few rows. Shape: one int per pass. A user without rows is not trained."""
    if width < 1:
        raise ValueError(f"a training step needs at least one user, not {width}")

    def batches(count: int) -> list[int]:  # a user's batch sizes over every epoch, as ``batch_plan``'s
        full, rest = divmod(count, config.batch_size)
        return ([config.batch_size] * full + [rest] * (rest > 0)) * config.epochs

    waiting = deque(batches(count) for count in rows if count > 0)
    active: list[list[int]] = []
    passes: list[int] = []
    while waiting or active:
        while waiting and len(active) < width:
            active.append(waiting.popleft())
        step = [[row_tokens] * plan.pop(0) for plan in active]
        ranges = pass_ranges(step, config.micro_batch_rows, config.micro_batch_tokens)
        passes += [end - start for start, end in ranges]
        active = [plan for plan in active if plan]
    return passes


@dataclass
class _Active:
    """A user occupying a slot: their batch plan, progress and best module so far."""

    data: UserData
    slot: int
    batches_per_epoch: int
    total_steps: int
    warmup_steps: int
    started: float
    plan: Iterator[tuple[int, list[int], bool]] = field(init=False)
    steps: int = 0
    epoch_loss: float = 0.0
    epoch_tokens: int = 0
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    stale_epochs: int = 0
    done: bool = False


class MultiUserTrainer:
    """Moves a queue of users through the bank's slots until every one is trained. Slots come from the
    engine's ``SlotManager`` (one is made when none is given); a user in training holds their slot
    pinned, and leaves it as the identity."""

    def __init__(self, engine: Engine, config: TrainConfig, slots: SlotManager | None = None) -> None:
        self.engine = engine
        self.config = config
        self.bank = engine.single_bank()
        self.slots = slots or SlotManager(self.bank)
        capacity = self.slots.capacity
        self.width = min(capacity, config.users_per_step or capacity)
        self.optimizer = SlotAdamW(self.bank.tensors, config)

    # ---- plans ------------------------------------------------------------------------------------

    def batch_plan(self, user: UserData) -> Iterator[tuple[int, list[int], bool]]:
        """(epoch, row indices, last batch of the epoch?) in the order this user always sees them."""
        for epoch in range(self.config.epochs):
            chunks = epoch_batches(self.config, user.user_id, len(user.train), epoch)
            for index, chunk in enumerate(chunks):
                yield epoch, chunk, index == len(chunks) - 1

    def _admit(self, user: UserData) -> _Active:
        if not user.train:
            raise EngineError(f"user {user.user_id!r} has no training examples")
        if user.init is not None:
            slot = self.slots.place(user.user_id, user.init)
        else:
            fresh = torch.Generator().manual_seed(seed_for(self.config.seed, user.user_id, "init"))
            slot = self.slots.place(user.user_id, generator=fresh)
        self.optimizer.reset(slot)
        per_epoch = self.config.batches(len(user.train))
        total = self.config.steps(len(user.train))
        active = _Active(
            user, slot, per_epoch, total, math.ceil(total * self.config.warmup_ratio), time.perf_counter()
        )
        active.plan = self.batch_plan(user)
        return active

    # ---- the loop ---------------------------------------------------------------------------------

    def run(
        self,
        users: Sequence[UserData],
        on_done: Callable[[UserResult], None] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[UserResult]:
        ids = [u.user_id for u in users]
        if len(set(ids)) != len(ids):
            raise EngineError("user ids in one training job must be unique")
        queue = deque(users)
        active: dict[str, _Active] = {}
        results: list[UserResult] = []
        total_steps = sum(self.config.steps(len(u.train)) for u in users)
        done_steps = 0
        with self.engine.training():
            while queue or active:
                while queue and len(active) < self.width:
                    user = queue.popleft()
                    active[user.user_id] = self._admit(user)
                with self.slots.pinned_slots([a.slot for a in active.values()]):
                    done_steps += self._step(list(active.values()))
                if on_progress is not None:
                    on_progress(done_steps, total_steps)
                for user_id in [u for u, a in active.items() if a.done]:
                    result = self._finish(active.pop(user_id))
                    results.append(result)
                    if on_done is not None:
                        on_done(result)
                    self.slots.evict(user_id)
        return results

    def _step(self, users: list[_Active]) -> int:
        """One optimizer step of every user in ``users``: the step's rows encoded once, run in passes
        (``pass_ranges``) whose gradients add up in the bank. Each row's summed token loss is divided by
        its user's target tokens in the whole step, so a user's loss is their own mean however the passes
        cut the rows, and their gradient is the one they would get alone."""
        batches = [(user, *next(user.plan)) for user in users]  # (user, epoch, row indices, epoch ended)
        rows = [Row(*user.data.train[i], slot=user.slot) for user, _, indices, _ in batches for i in indices]
        owner = torch.tensor([k for k, (_, _, indices, _) in enumerate(batches) for _ in indices])  # [rows]
        step = self.engine.encode(rows)
        sizes = [len(indices) for _, _, indices, _ in batches]
        lengths = [part.tolist() for part in step.attention_mask.sum(dim=1).split(sizes)]  # per batch
        targets = (step.labels[:, 1:] != IGNORE).sum(dim=1).cpu()  # [rows], as ``token_nll`` counts them
        tokens = torch.zeros(len(batches), dtype=torch.long).index_add(0, owner, targets)  # [users]
        weight = 1.0 / tokens.clamp(min=1)[owner].to(torch.float32)  # [rows]
        summed = torch.zeros(len(batches), dtype=torch.float64)  # [users]: their loss, for the epoch mean
        for start, end in pass_ranges(lengths, self.config.micro_batch_rows, self.config.micro_batch_tokens):
            sums, _ = self.engine.token_nll(step.rows(start, end))
            (sums * weight[start:end].to(sums.device)).sum().backward()
            summed.index_add_(0, owner[start:end], sums.detach().double().cpu())
        slots = torch.tensor([u.slot for u in users])
        factors = [linear_schedule(u.steps, u.total_steps, u.warmup_steps) for u in users]
        self.optimizer.step(slots, self.config.learning_rate * torch.tensor(factors))
        for tensor in self.bank.tensors.values():
            tensor.grad = None
        for k, (user, _, _, epoch_end) in enumerate(batches):
            user.steps += 1
            user.epoch_loss += float(summed[k])  # the summed token loss: the epoch's mean divides once
            user.epoch_tokens += int(tokens[k])
            if epoch_end:
                self._end_epoch(user)
        return len(users)

    def _end_epoch(self, user: _Active) -> None:
        user.train_losses.append(user.epoch_loss / max(1, user.epoch_tokens))
        user.epoch_loss, user.epoch_tokens = 0.0, 0
        epoch = len(user.train_losses) - 1
        if user.data.val:
            loss = self.validation_loss(user.data.val, user.slot)
            user.val_losses.append(loss)
            if user.best is None or loss < user.best[0]:
                user.best = (loss, epoch, self.bank.read(user.slot))
                user.stale_epochs = 0
            else:
                user.stale_epochs += 1
            if self.config.patience is not None and user.stale_epochs >= self.config.patience:
                user.done = True
        if epoch + 1 == self.config.epochs:
            user.done = True

    @torch.no_grad()
    def validation_loss(self, pairs: Sequence[tuple[str, str]], slot: int, batch_size: int = 16) -> float:
        total, tokens = 0.0, 0
        for start in range(0, len(pairs), batch_size):
            chunk = [Row(p, t, slot) for p, t in pairs[start : start + batch_size]]
            sums, counts = self.engine.token_nll(self.engine.encode(chunk))
            total, tokens = total + float(sums.sum()), tokens + int(counts.sum())
        return total / max(1, tokens)

    def _finish(self, user: _Active) -> UserResult:
        module = user.best[2] if user.best is not None else self.bank.read(user.slot)
        return UserResult(
            user.data.user_id,
            module,
            user.steps,
            len(user.train_losses),
            user.best[1] if user.best is not None else None,
            user.train_losses,
            user.val_losses,
            time.perf_counter() - user.started,
        )
