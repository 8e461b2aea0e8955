"""Collaborative tokens for a task with ordered labels: matrix factorisation's view of a user, read by the
shared model (``kinds.collab``).

Three parts, each fitted on training answers only:

- the item factors: biased matrix factorisation (Surprise's ``SVD``, ``factors`` per item) of every
  user's training answers, as label positions; frozen from then on;
- each user's vector ``[b_u, p_u]``, folded in against the frozen items: the ridge solution of
  ``r - mu - b_i = b_u + q_i . p_u`` over the user's own training answers (items the factorisation does
  not know are skipped; a user with none gets 0, the average user). A new user's vector needs nothing
  but their own answers, so adding one to a running system retrains no one. The ridge penalty is chosen
  once per task on the task adapter's users' validation answers (the rating error of the folded-in
  factorisation);
- the shared MLP that maps a vector to soft tokens, trained on the task adapter's users' examples with the
  task adapter merged into the base and frozen: the cross-entropy of the gold label among the labels
  (``Engine.label_scores``), the epoch with the lowest validation loss kept.

A user's own part is their vector, stored as a module of the collab kind (at most 1 KB) and served from
a slot like any module. The run keeps what every user shares (the spec, the MLP, the item factors and
the fingerprint of the task adapter under the MLP) as one ``CollabPart`` folder, which a users store
copies (``users import --collab``) to fold its users in and serve them.

The item's factors never enter the model: it reads the item's text, so an item nobody answered in
training is handled like any other, from its text alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tailorlm import kinds, metrics
from tailorlm.data.schema import Task, User
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.files import atomic_folder
from tailorlm.kinds.collab import IN_BIAS, IN_WEIGHT, OUT_BIAS, OUT_WEIGHT, VECTOR, CollabSpec
from tailorlm.methods.baselines import fit_surprise
from tailorlm.methods.deps import MethodDeps
from tailorlm.methods.label_models import LabelAnswerer, by_distribution
from tailorlm.methods.label_parts import has_label
from tailorlm.methods.personal import PersonalTraining, train_personal
from tailorlm.methods.recipes import Recipe
from tailorlm.methods.setups import Answerer, Query, TaskAdapterSetup, prompts_for

# Ridge penalties tried for fold-in, in units of one answer's squared error.
FOLD_IN_PENALTIES = (0.3, 1.0, 3.0, 10.0, 30.0)
# The shared MLP's training: AdamW at this rate, this many epochs over the task adapter's examples.
PROJECTOR_RATE = 1e-3
PROJECTOR_EPOCHS = 2
# The task's collab part (``CollabPart``), in the run's modules folder; ``users import --collab`` takes it.
SHARED_FOLDER = "collab-shared-{tag}"
SHARED_FILE = "shared.safetensors"  # the trained MLP
ITEMS_FILE = "items.safetensors"  # the item factors ``factors`` [items, factors] and biases ``bias`` [items]
PART_FILE = "collab.json"  # the spec, the items' keys (in the rows' order), the mean, the penalty

Answer = tuple[str, float]  # (item key, label position)


def answers_of(task: Task, user: User, split: str = "train") -> list[Answer]:
    """The user's (item, label position) answers of one split (``train``: their training examples)."""
    examples = task.training_examples(user) if split == "train" else user.val
    return [
        (e.item_key, float(metrics.label_index(e.targets[0], task.labels)))
        for e in examples
        if e.item_key is not None and has_label(task, e)
    ]


@dataclass(frozen=True)
class ItemFactors:
    """The frozen items of a factorisation: the global mean, each item's bias ``b_i`` and factors ``q_i``
    ``[factors]``, and the ridge penalty users are folded in with."""

    mean: float
    bias: Mapping[str, float]
    factors: Mapping[str, torch.Tensor]
    size: int
    penalty: float = 1.0

    @classmethod
    def fit(cls, task: Task, size: int, seed: int) -> ItemFactors:
        """Biased MF of every user's training answers (``baselines.fit_surprise``)."""
        from surprise import SVD

        fitted = fit_surprise(task, SVD(n_factors=size, random_state=seed))
        trainset = fitted.trainset
        bias, factors = {}, {}
        for inner in trainset.all_items():
            raw = trainset.to_raw_iid(inner)
            bias[raw] = float(fitted.bi[inner])
            factors[raw] = torch.tensor(fitted.qi[inner], dtype=torch.float64)
        return cls(float(trainset.global_mean), bias, factors, size)

    def fingerprint(self) -> str:
        """sha256 of everything a folded-in vector depends on (mean, penalty, each item's bias and
        factors): a user's module keeps the one it was folded in against, so a store whose items changed
        since shows that user stale."""
        keys = sorted(self.factors)
        tensors = {
            "bias": torch.tensor([self.bias[k] for k in keys], dtype=torch.float64),
            "factors": torch.stack([self.factors[k].double() for k in keys])
            if keys
            else torch.zeros(0, self.size, dtype=torch.float64),
            "scalars": torch.tensor([self.mean, self.penalty], dtype=torch.float64),
        }
        digest = hashlib.sha256(json.dumps(keys).encode("utf-8"))
        digest.update(tensors_fingerprint(tensors).encode("ascii"))
        return digest.hexdigest()

    def fold_in(self, answers: Sequence[Answer], penalty: float | None = None) -> torch.Tensor:
        """A user's vector ``[factors + 1]`` (their bias, then their factors) from their ``answers``: the
        ridge solution ``(X^T X + penalty I)^-1 X^T y`` with rows ``x = [1, q_i]`` and ``y = r - mu - b_i``
        over the items the factorisation knows. No such item: 0, the average user."""
        known = [(item, r) for item, r in answers if item in self.factors]
        if not known:
            return torch.zeros(self.size + 1)
        x = torch.stack([torch.cat([torch.ones(1, dtype=torch.float64), self.factors[i]]) for i, _ in known])
        y = torch.tensor([r - self.mean - self.bias[i] for i, r in known], dtype=torch.float64)
        ridge = (self.penalty if penalty is None else penalty) * torch.eye(self.size + 1, dtype=torch.float64)
        return torch.linalg.solve(x.T @ x + ridge, x.T @ y).float()

    def predict(self, vector: torch.Tensor, item: str | None) -> float:
        """The factorisation's estimate (a label position) for the user of ``vector`` on ``item``."""
        estimate = self.mean + float(vector[0])
        if item in self.factors:
            estimate += self.bias[item] + float(self.factors[item].float() @ vector[1:])
        return estimate

    def with_penalty(self, task: Task, users: Sequence[User]) -> ItemFactors:
        """The same items with the penalty of ``FOLD_IN_PENALTIES`` whose folded-in vectors (from each
        user's training answers) have the lowest absolute error on ``users``' validation answers; ties and
        no validation answers keep the smallest penalty's neighbour 1.0."""
        best, best_error = 1.0, math.inf
        for penalty in FOLD_IN_PENALTIES:
            errors = []
            for user in users:
                vector = self.fold_in(answers_of(task, user), penalty)
                errors += [abs(self.predict(vector, item) - r) for item, r in answers_of(task, user, "val")]
            if errors and sum(errors) / len(errors) < best_error:
                best, best_error = penalty, sum(errors) / len(errors)
        return ItemFactors(self.mean, self.bias, self.factors, self.size, best)

    def module(self, task: Task, user: User) -> dict[str, torch.Tensor]:
        """``user``'s collab module: their vector folded in from their own training answers."""
        return {VECTOR: self.fold_in(answers_of(task, user))}


class CollabPartError(ValueError):
    """A collab part folder that is missing a file or does not hold what a collab part holds."""


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors``, in name order: which task adapter
    a collab part's MLP was trained over."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CollabPart:
    """What every collab user of one task shares, kept in one folder: the spec, the trained MLP
    (``shared``, named as ``kinds.collab`` names it), the frozen item factors users are folded in
    against, and the fingerprint of the task adapter the MLP was trained over (None: the bare base)."""

    spec: CollabSpec
    shared: dict[str, torch.Tensor]
    items: ItemFactors
    task_adapter: str | None

    def save(self, folder: Path) -> None:
        """Write the part into ``folder``, replacing it atomically."""
        keys = sorted(self.items.factors)
        with atomic_folder(Path(folder)) as staging:
            save_file({k: t.contiguous() for k, t in self.shared.items()}, str(staging / SHARED_FILE))
            factors = [self.items.factors[k].double() for k in keys]
            save_file(
                {
                    "factors": torch.stack(factors)
                    if factors
                    else torch.zeros(0, self.items.size, dtype=torch.float64),
                    "bias": torch.tensor([self.items.bias[k] for k in keys], dtype=torch.float64),
                },
                str(staging / ITEMS_FILE),
            )
            meta = {
                "spec": kinds.spec_to_dict(self.spec),
                "items": keys,
                "mean": self.items.mean,
                "penalty": self.items.penalty,
                "task_adapter": self.task_adapter,
            }
            (staging / PART_FILE).write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> CollabPart:
        """The part in ``folder``; ``CollabPartError`` naming what is wrong with it."""
        folder = Path(folder)
        missing = [n for n in (PART_FILE, SHARED_FILE, ITEMS_FILE) if not (folder / n).is_file()]
        if missing:
            raise CollabPartError(
                f"{folder} is not a collab part (a bench run's modules/{SHARED_FOLDER.format(tag='TAG')}): "
                f"{', '.join(missing)} missing"
            )
        try:
            meta = _part_meta(folder / PART_FILE)
            spec = kinds.validate(kinds.spec_from_dict(meta["spec"]))
            if not isinstance(spec, CollabSpec):
                raise CollabPartError(f"{folder / PART_FILE}: a {spec.kind} spec, not a collab one")
            shared, table = load_file(str(folder / SHARED_FILE)), load_file(str(folder / ITEMS_FILE))
            _check_tensors(folder / SHARED_FILE, shared, {IN_WEIGHT, IN_BIAS, OUT_WEIGHT, OUT_BIAS})
            _check_tensors(folder / ITEMS_FILE, table, {"factors", "bias"})
            keys, factors, bias = meta["items"], table["factors"], table["bias"]
            if factors.shape != (len(keys), spec.factors) or bias.shape != (len(keys),):
                raise CollabPartError(
                    f"{folder / ITEMS_FILE}: factors {tuple(factors.shape)} and biases {tuple(bias.shape)} "
                    f"do not fit {len(keys)} items of {spec.factors} factors"
                )
            items = ItemFactors(
                float(meta["mean"]),
                {k: float(b) for k, b in zip(keys, bias.tolist(), strict=True)},
                {k: factors[i] for i, k in enumerate(keys)},
                spec.factors,
                float(meta["penalty"]),
            )
            return cls(spec, shared, items, meta["task_adapter"])
        except CollabPartError:
            raise
        except Exception as error:  # JSON, safetensors and spec errors of a damaged or foreign folder
            raise CollabPartError(
                f"{folder}: not a readable collab part ({type(error).__name__}: {error})"
            ) from None


def _part_meta(path: Path) -> dict:
    """``collab.json``, checked: what a fold-in reads must be numbers it can solve with, and item keys
    as history records hold them (distinct strings: an item twice, or an int, would fold users in
    against the wrong items, or none, without a word)."""
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or not {"spec", "items", "mean", "penalty"} <= set(meta):
        raise CollabPartError(f"{path}: not an object with spec, items, mean and penalty")
    items = meta["items"]
    if not isinstance(items, list) or not all(isinstance(k, str) for k in items):
        raise CollabPartError(f"{path}: items must be a list of item keys (strings)")
    if len(set(items)) != len(items):
        raise CollabPartError(f"{path}: an item key appears more than once in items")
    for name in ("mean", "penalty"):
        value = meta[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise CollabPartError(f"{path}: {name} must be a finite number, not {value!r}")
    if meta["penalty"] <= 0:  # the ridge keeps a user with fewer answers than factors solvable
        raise CollabPartError(f"{path}: penalty must be above 0, not {meta['penalty']!r}")
    if meta.get("task_adapter") is not None and not isinstance(meta["task_adapter"], str):
        raise CollabPartError(f"{path}: task_adapter must be a fingerprint (a string) or null")
    return {**meta, "task_adapter": meta.get("task_adapter")}


def _check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], names: set[str]) -> None:
    """``tensors`` are exactly ``names``, each floating point and finite (a NaN would reach every
    user's vector or tokens)."""
    if set(tensors) != names:
        raise CollabPartError(f"{path}: holds {sorted(tensors)}, a collab part holds {sorted(names)}")
    for name, tensor in sorted(tensors.items()):
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise CollabPartError(f"{path}: {name} must hold finite floating-point numbers")


class CollabSetup:
    """Collaborative tokens on the task adapter: every user's vector folded in and stored as their module,
    the shared MLP trained once on the task adapter's users, answers from each user's slot."""

    def __init__(self, spec: CollabSpec | None = None) -> None:
        self.spec = spec or CollabSpec()

    def store_name(self, recipe: Recipe) -> str:
        return f"collab-{recipe.tag}"

    def prepare(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> LabelAnswerer:
        return by_distribution(self.answerer(deps, method, recipe, users))

    def answerer(self, deps: MethodDeps, method: str, recipe: Recipe, users: Sequence[User]) -> Answerer:
        """An answerer whose slots hold each user's vector and whose bank holds the trained MLP; every
        missing vector is folded in and stored first (the task adapter's users' too: the MLP trains on
        them)."""
        task = deps.task
        train, val = TaskAdapterSetup.pooled(deps)
        base = TaskAdapterSetup().merged_base(deps, recipe)
        trained_on = {u.id: u for u, _ in (*train, *val)}
        slots = max(len(trained_on), deps.settings.answer_group) + 1
        engine = deps.engine(self.spec, slots=slots, base=base)
        builder = deps.builder(recipe, engine.tokenizer)
        store = deps.store(self.store_name(recipe))
        # Every user a model row may ask about: the blend scores the task adapter's users' validation
        # answers too, beyond the capped sample the MLP trains on.
        everyone = {**{u.id: u for u in deps.adapter_users}, **trained_on, **{u.id: u for u in users}}
        missing = [u for u in everyone.values() if not store.has(u.id)]
        folder = deps.modules / SHARED_FOLDER.format(tag=recipe.tag)
        part = CollabPart.load(folder) if (folder / PART_FILE).is_file() else None  # a resumed run's
        items = part.items if part is not None else None
        if missing:
            items = items or self._items(deps)
            training = PersonalTraining(
                method,
                builder,
                fold_in=lambda user: items.module(task, user),
                folded_against=items.fingerprint(),
            )
            train_personal(deps, engine, store, missing, training)
            deps.reporter.log(
                f"{method}: {len(missing)} users folded in against {len(items.factors)} items' factors "
                f"(penalty {items.penalty:g})"
            )
        else:
            deps.reporter.log(f"{method}: every user's vector is stored already")
        if part is None:
            if (folder / SHARED_FILE).is_file():  # a run of an earlier version kept the MLP alone
                engine.bank.write_shared(load_file(str(folder / SHARED_FILE)))
            else:
                self._train_shared(deps, engine, store, builder, method, train, val)
            adapter = TaskAdapterSetup().ensure_trained(deps, recipe).get(TaskAdapterSetup.USER).tensors
            items = items or self._items(deps)
            part = CollabPart(self.spec, engine.bank.read_shared(), items, tensors_fingerprint(adapter))
            part.save(folder)
        engine.bank.write_shared(part.shared)
        manager = SlotManager(engine.bank, store.loader(self.spec))
        return Answerer(deps, method, engine, builder, deps.settings.answer_group, slots=manager)

    def _items(self, deps: MethodDeps) -> ItemFactors:
        """The task's item factors (fitted on every training answer), with the fold-in penalty chosen on
        the task adapter's users."""
        items = ItemFactors.fit(deps.task, self.spec.factors, deps.settings.seed)
        return items.with_penalty(deps.task, deps.adapter_users)

    def _train_shared(
        self,
        deps: MethodDeps,
        engine: Engine,
        store,
        builder,
        method: str,
        train: list[Query],
        val: list[Query],
    ) -> None:
        """The shared MLP trained on ``train`` with each user's stored vector in a slot of their own and
        the model frozen; the epoch of the lowest loss on ``val`` is kept."""
        task = deps.task
        train = [(u, e) for u, e in train if has_label(task, e)]
        val = [(u, e) for u, e in val if has_label(task, e)]
        slot_of = {}
        for slot, user_id in enumerate(dict.fromkeys(u.id for u, _ in (*train, *val)), 1):
            engine.bank.write(slot, store.get(user_id).tensors)
            slot_of[user_id] = slot
        rows = Rows(deps, builder, method, slot_of, train, val)
        shared = list(engine.bank.shared.values())
        optimizer = torch.optim.AdamW(shared, lr=PROJECTOR_RATE, weight_decay=0.0)
        batch_size = deps.settings.adapter_batch_size
        progress = deps.reporter.progress(f"{method}: shared MLP")
        total = PROJECTOR_EPOCHS * math.ceil(len(train) / batch_size)
        best_loss, kept, step = rows.loss(engine, task.labels, grad=False), engine.bank.read_shared(), 0
        deps.reporter.log(f"{method}: shared MLP before training, validation loss {best_loss:.4f}")
        order = list(range(len(train)))
        # Only the MLP takes gradients (the users' vectors and the model stay as they are); the
        # validation passes run without a graph whatever the flag says.
        for tensor in shared:
            tensor.requires_grad_(True)
        try:
            for epoch in range(PROJECTOR_EPOCHS):
                random.Random(deps.settings.seed + epoch).shuffle(order)
                for start in range(0, len(order), batch_size):
                    optimizer.zero_grad()
                    rows.loss(engine, task.labels, grad=True, indices=order[start : start + batch_size])
                    optimizer.step()
                    step += 1
                    progress(step, total)
                loss = rows.loss(engine, task.labels, grad=False)
                deps.reporter.log(f"{method}: shared MLP epoch {epoch + 1}, validation loss {loss:.4f}")
                if loss < best_loss:
                    best_loss, kept = loss, engine.bank.read_shared()
        finally:
            for tensor in shared:
                tensor.requires_grad_(False)
        engine.bank.write_shared(kept)
        for slot in slot_of.values():
            engine.bank.clear(slot)


class Rows:
    """The shared MLP's training and validation rows: prompts, slots and gold label indices."""

    def __init__(
        self,
        deps: MethodDeps,
        builder,
        method: str,
        slot_of: Mapping[str, int],
        train: Sequence[Query],
        val: Sequence[Query],
    ) -> None:
        labels = deps.task.labels

        def prepared(queries: Sequence[Query], purpose: str) -> tuple[list[str], list[int], list[int]]:
            prompts = [
                prompts_for(deps, builder, method, purpose, [query], query[0].id)[0] for query in queries
            ]
            slots = [slot_of[user.id] for user, _ in queries]
            golds = [metrics.label_index(e.targets[0], labels) for _, e in queries]
            return prompts, slots, golds

        self.train = prepared(train, "train")
        self.val = prepared(val, "validate")

    def loss(
        self, engine: Engine, labels: Sequence[str], grad: bool, indices: Sequence[int] | None = None
    ) -> float:
        """The mean cross-entropy of the gold labels: over ``indices`` of the training rows with the
        gradient (backward run here), or over every validation row without (0 rows: infinity)."""
        prompts, slots, golds = self.train if grad else self.val
        chosen = list(indices) if indices is not None else list(range(len(prompts)))
        if not chosen:
            return math.inf
        with torch.set_grad_enabled(grad):
            scores = engine.label_scores([prompts[i] for i in chosen], [slots[i] for i in chosen], labels)
            wanted = torch.tensor([golds[i] for i in chosen], device=scores.device)
            loss = torch.nn.functional.cross_entropy(scores.float(), wanted)
            if grad:
                loss.backward()
        return float(loss.detach())
