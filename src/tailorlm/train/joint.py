"""A shared module trained to choose among a task's labels, jointly with a bias over the labels per user.

The model: for an example ``x`` of user ``u``, ``p(label | x, u) = softmax(s(x) + b_u)``, where ``s(x)``
``[labels]`` are the summed log-probabilities of each label under the base plus the shared module
(``Engine.label_scores``) and ``b_u`` ``[labels]`` is the user's bias. Training minimises

    sum over examples of CE(s(x) + b_u, y)  +  shrinkage / 2 * sum over users of |b_u|^2

over the shared module and every training user's bias together, so the shared module learns what the
items say with each user's leaning taken out, instead of the average user's leaning. A new user later
fits only their own ``b_u`` against the frozen shared module (``fit_bias``, the same penalty): nothing
shared changes.

How: block-coordinate descent. Before each step, the biases of that step's users are refitted exactly
(``fit_bias``, a convex problem) to the latest scores the trainer has seen of those users' examples
(scores from earlier steps, detached; a user none of whose examples has been seen yet has bias 0); then
the shared module takes one AdamW step on the step's loss with those biases held fixed. Each epoch ends
with the loss of the validation examples under every user's current bias, and the best epoch's module
and biases are kept, as ``MultiUserTrainer`` keeps a user's best epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tailorlm.engine.bank import EngineError
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.progress import ProgressCallback
from tailorlm.train.optimizer import SlotAdamW, linear_schedule
from tailorlm.train.trainer import TrainConfig, epoch_batches, seed_for


def fit_bias(scores: torch.Tensor, targets: Sequence[int], shrinkage: float) -> torch.Tensor:
    """The bias ``b`` ``[labels]`` minimising the summed cross-entropy of ``softmax(scores + b)`` against
    ``targets`` plus ``shrinkage / 2 * |b|^2``; ``scores`` ``[rows, labels]`` (log-probabilities or any
    logits). A convex problem, solved by L-BFGS to the tolerance. No examples, or infinite shrinkage,
    give 0 (the shared model alone); the penalty also fixes the constant a softmax ignores."""
    labels = scores.shape[1]
    if not targets or math.isinf(shrinkage):
        return torch.zeros(labels)
    logits = scores.detach().double()
    wanted = torch.tensor(list(targets))
    bias = torch.zeros(labels, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [bias],
        lr=1.0,
        max_iter=200,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits + bias, wanted, reduction="sum")
        loss = loss + shrinkage / 2 * bias.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return bias.detach().float()


@dataclass(frozen=True)
class LabelExample:
    """One labelled example: whose it is, its prompt, and the index of its label in the labels."""

    user_id: str
    prompt: str
    label: int


@dataclass
class JointResult:
    module: dict[str, torch.Tensor]  # the shared module's tensors, as ``SlotBank.read`` gives them
    biases: dict[str, torch.Tensor]  # per training user, ``[labels]``, at the kept epoch
    steps: int
    best_epoch: int | None
    train_losses: list[float]  # mean cross-entropy per example per epoch, biases included
    val_losses: list[float]
    seconds: float

    def meta(self, shrinkage: float) -> dict:
        return {
            "objective": "the label's likelihood among the labels, joint with a bias per user",
            "shrinkage": shrinkage,
            "bias_users": len(self.biases),
            "steps": self.steps,
            "best_epoch": self.best_epoch,
            "train_losses": self.train_losses,
            "val_losses": self.val_losses,
            "train_seconds": self.seconds,
        }


class _State:
    """One run's progress: the latest detached scores of every training example it has run
    (``[examples, labels]``, with which have been), its steps and its losses."""

    def __init__(self, train: Sequence[LabelExample], slot: int, labels: int, config: TrainConfig) -> None:
        self.train = train
        self.slot = slot
        self.targets = torch.tensor([e.label for e in train])
        self.scores = torch.zeros(len(train), labels)
        self.seen = torch.zeros(len(train), dtype=torch.bool)
        self.rows_of: dict[str, list[int]] = {}
        for i, example in enumerate(train):
            self.rows_of.setdefault(example.user_id, []).append(i)
        self.total = config.steps(len(train))
        self.warmup = math.ceil(self.total * config.warmup_ratio)
        self.steps = 0
        self.epoch_loss = 0.0
        self.train_losses: list[float] = []
        self.val_losses: list[float] = []

    def end_epoch(self) -> None:
        self.train_losses.append(self.epoch_loss / len(self.train))
        self.epoch_loss = 0.0


class JointTrainer:
    """Trains one shared module (a slot of ``engine``'s bank) and a bias per user on ``LabelExample``s
    over ``labels``. Deterministic in ``config.seed``."""

    def __init__(self, engine: Engine, labels: Sequence[str], config: TrainConfig, shrinkage: float) -> None:
        if not labels:
            raise EngineError("joint training needs the task's labels")
        if shrinkage < 0:
            raise EngineError(f"shrinkage must be >= 0, got {shrinkage}")
        self.engine = engine
        self.labels = list(labels)
        self.config = config
        self.shrinkage = shrinkage
        self.optimizer = SlotAdamW(engine.single_bank().tensors, config)

    def run(
        self,
        module_id: str,
        train: Sequence[LabelExample],
        val: Sequence[LabelExample] = (),
        on_progress: ProgressCallback | None = None,
    ) -> JointResult:
        if not train:
            raise EngineError("joint training needs at least one labelled example")
        for example in (*train, *val):
            if not 0 <= example.label < len(self.labels):
                raise EngineError(
                    f"label index {example.label} of user {example.user_id!r} is not one of the labels"
                )
        started = time.perf_counter()
        slots = SlotManager(self.engine.bank)
        init = torch.Generator().manual_seed(seed_for(self.config.seed, module_id, "init"))
        slot = slots.place(module_id, generator=init)
        self.optimizer.reset(slot)
        state = _State(train, slot, len(self.labels), self.config)
        best_loss, best_epoch = math.inf, None
        with slots.pinned_slots([slot]), self.engine.training():
            for epoch in range(self.config.epochs):
                for batch in epoch_batches(self.config, module_id, len(train), epoch):
                    self._step(state, batch)
                    if on_progress is not None:
                        on_progress(state.steps, state.total)
                state.end_epoch()
                if val:  # the epoch with the lowest validation loss is kept, module and biases
                    biases = self._biases(state, state.rows_of)
                    state.val_losses.append(self._loss(val, biases, slot))
                    if best_epoch is None or state.val_losses[-1] < best_loss:
                        best_loss, best_epoch = state.val_losses[-1], epoch
                        kept = (self.engine.bank.read(slot), biases)
        if best_epoch is None:  # no validation examples: the last epoch is kept
            kept = (self.engine.bank.read(slot), self._biases(state, state.rows_of))
        slots.evict(module_id)
        return JointResult(
            *kept,
            state.steps,
            best_epoch,
            state.train_losses,
            state.val_losses,
            time.perf_counter() - started,
        )

    def _biases(self, state: _State, users: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
        """Each user's bias fitted to the latest scores of their examples seen so far."""
        found = {}
        for user, rows in users.items():
            known = [i for i in rows if state.seen[i]]
            found[user] = fit_bias(state.scores[known], state.targets[known].tolist(), self.shrinkage)
        return found

    def _step(self, state: _State, rows: list[int]) -> None:
        """One optimizer step on ``rows``: their users' biases refitted first, then forward and backward in
        chunks of about ``micro_batch_rows`` scored continuations; the loss is the batch's mean
        cross-entropy, so the chunks' gradients add up to the batch's."""
        train = state.train
        biases = self._biases(state, {u: state.rows_of[u] for u in {train[i].user_id for i in rows}})
        chunk_size = max(1, self.config.micro_batch_rows // len(self.labels))
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            prompts = [train[i].prompt for i in chunk]
            scores = self.engine.label_scores(prompts, [state.slot] * len(chunk), self.labels)
            state.scores[chunk] = scores.detach().float().cpu()
            state.seen[chunk] = True
            bias = torch.stack([biases[train[i].user_id] for i in chunk]).to(scores)
            wanted = state.targets[chunk].to(scores.device)
            loss = torch.nn.functional.cross_entropy(scores + bias, wanted, reduction="sum")
            (loss / len(rows)).backward()
            state.epoch_loss += float(loss.detach())
        factor = linear_schedule(state.steps, state.total, state.warmup)
        rate = torch.tensor([self.config.learning_rate * factor])
        self.optimizer.step(torch.tensor([state.slot]), rate)
        for tensor in self.engine.bank.tensors.values():
            tensor.grad = None
        state.steps += 1

    @torch.no_grad()
    def _loss(self, examples: Sequence[LabelExample], biases: dict[str, torch.Tensor], slot: int) -> float:
        """Mean cross-entropy of ``examples`` under the current module and their users' biases (0 for a
        user without one)."""
        total = 0.0
        size = max(1, self.config.micro_batch_rows)
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            scores = self.engine.label_scores([e.prompt for e in chunk], [slot] * len(chunk), self.labels)
            zero = torch.zeros(len(self.labels))
            bias = torch.stack([biases.get(e.user_id, zero) for e in chunk]).to(scores)
            wanted = torch.tensor([e.label for e in chunk], device=scores.device)
            total += float(torch.nn.functional.cross_entropy(scores + bias, wanted, reduction="sum"))
        return total / len(examples)
