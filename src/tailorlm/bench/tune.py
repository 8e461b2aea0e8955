"""Choosing a module recipe on validation data: train a sample of users with each candidate learning rate,
then compare their best validation loss (the loss PEFT-U picks epochs by) and the task's metric on their
validation items, answered the way the benchmark answers. Test items are never read, and the users come
from neither the benchmark's test sample nor the task adapter's training users."""

from __future__ import annotations

import gc
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tailorlm import metrics
from tailorlm.bench.config import BenchConfig, split_users
from tailorlm.bench.results import gold_value
from tailorlm.data import load_task
from tailorlm.data.schema import Task, User
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.methods.decoding import check_decoding, default_decoding
from tailorlm.methods.deps import MethodDeps, base_loader
from tailorlm.methods.personal import PersonalSetup
from tailorlm.methods.recipes import PromptBuilder
from tailorlm.methods.registry import methods_for
from tailorlm.methods.setups import answer_examples, personal_job
from tailorlm.progress import Reporter
from tailorlm.train.jobs import LocalRunner, TrainRunner, TrainWork
from tailorlm.train.trainer import TrainConfig

SELECT_BY = ("metric", "loss")


def tuning_users(task: Task, test_users: Sequence[User], adapter_users: Sequence[User]) -> list[User]:
    """Users with validation items that neither the test sample nor the task adapter uses (OPPU's task
    adapter has seen its users' training examples, which would flatter the personal modules tuned on
    them); when every other user trains the adapter, the adapter's users are the only ones left."""
    test_ids = {u.id for u in test_users}
    used = test_ids | {u.id for u in adapter_users}
    fresh = [u for u in task.users if u.val and task.training_examples(u) and u.id not in used]
    return fresh or [u for u in adapter_users if u.id not in test_ids and u.val]


def tune(
    task_name: str,
    method: str,
    learning_rates: Sequence[float],
    users: int = 8,
    epochs: int = 2,
    config: BenchConfig | None = None,
    select_by: str = "metric",
    reporter: Reporter | None = None,
    runner: TrainRunner | None = None,
    data_dir: str | Path | None = None,
    split: str | None = None,
) -> dict:
    """Per learning rate: the users' mean best validation loss and mean validation metric. ``runner``
    decides where the users train (default: this process); ``data_dir`` and ``split`` are ``load_task``'s
    (PEFT-U and LaMP files, your own table under a task file)."""
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, not {select_by!r}")
    config = config or BenchConfig()
    task = load_task(task_name, data_dir=data_dir, split=split, seed=config.seed)
    chosen = methods_for(task).get(method)
    if chosen is None or not isinstance(chosen.setup, PersonalSetup):
        personal = [m.name for m in methods_for(task).values() if isinstance(m.setup, PersonalSetup)]
        raise ValueError(f"{method!r} is not a per-user module method; choose one of {', '.join(personal)}")
    decoding = check_decoding(task, config.decoding or default_decoding(task))
    reporter = reporter or Reporter()
    runner = runner or LocalRunner()
    test_users, adapter_users = split_users(task, config)
    # OPPU's task adapter is trained in a scratch folder once per tuning call, never in a run's folder,
    # and removed afterwards.
    with tempfile.TemporaryDirectory(prefix="tailorlm-tune-") as scratch:
        deps = MethodDeps(
            task,
            base_loader(config.model, config.device, config.dtype),
            Path(scratch) / "modules",
            config.method_settings(),
            adapter_users=adapter_users,
            reporter=reporter,
        )
        sample = tuning_users(task, test_users, adapter_users)[:users]
        if not sample:
            raise ValueError(f"task {task.name} has no users outside the test sample with validation items")
        primary = task.metrics[0]
        lower_is_better = primary in metrics.LOWER_IS_BETTER
        rows = []
        for rate in learning_rates:
            engine = chosen.setup.build_engine(deps, chosen.recipe)
            builder = deps.builder(chosen.recipe, engine.tokenizer)
            jobs = [personal_job(deps, builder, method, u) for u in sample]
            train_config = TrainConfig(
                epochs=epochs,
                batch_size=config.batch_size,
                learning_rate=rate,
                seed=config.seed,
                users_per_step=config.users_per_step,
            )
            # Trained through the runner into a scratch store, as the benchmark trains: the same modules
            # from either backend, read back from the store for scoring.
            store = deps.store(f"tune-{len(rows)}")
            runner.train(
                engine,
                TrainWork(train_config, jobs),
                store,
                fresh_base=lambda: chosen.setup.build_base(deps, chosen.recipe),
                on_progress=reporter.progress(f"{method} lr={rate:g}"),
            )
            diverged = [u.id for u in sample if not store.has(u.id)]  # no module with NaN or inf is stored
            if diverged:
                store.close()
                rows.append({"learning_rate": rate, "diverged": len(diverged), "users": len(sample)})
                reporter.log(f"{method} lr={rate:g}: diverged for {len(diverged)} of {len(sample)} users")
            else:
                records = [store.current(u.id) for u in sample]
                modules = {u.id: store.loader(engine.spec)(u.id) for u in sample}
                store.close()
                scored = _validation_scores(deps, method, engine, builder, sample, modules, decoding)
                rows.append(
                    {
                        "learning_rate": rate,
                        "val_loss": statistics.fmean(min(r.metrics["val_losses"]) for r in records),
                        "val_metric": scored["user_mean"][primary],
                        "users": len(records),
                        "best_epoch": statistics.fmean(r.metrics["best_epoch"] for r in records),
                    }
                )
                reporter.log(
                    f"{method} lr={rate:g}: validation loss {rows[-1]['val_loss']:.4f}, "
                    f"{primary} {rows[-1]['val_metric']:.4f}"
                )
            # Each rate trains on a fresh base copy: free the last one before the next is loaded.
            del engine
            gc.collect()
    candidates = [row for row in rows if "diverged" not in row]
    if not candidates:
        raise ValueError(
            f"{method}: the training diverged at every learning rate tried "
            f"({', '.join(f'{r:g}' for r in learning_rates)}); try lower ones"
        )
    best_row = min(candidates, key=_selection_key(select_by, lower_is_better))
    return {
        "task": task.name,
        "method": method,
        "epochs": epochs,
        "decoding": decoding,
        "metric": primary,
        "lower_is_better": lower_is_better,
        "select_by": select_by,
        "users": [u.id for u in sample],
        "candidates": rows,
        "best_learning_rate": best_row["learning_rate"],
    }


def _selection_key(select_by: str, lower_is_better: bool) -> Callable[[dict], tuple[float, float]]:
    def key(row: dict) -> tuple[float, float]:
        metric = row["val_metric"] if lower_is_better else -row["val_metric"]
        # The loss breaks ties between rates whose few validation answers all come out the same.
        return (row["val_loss"], metric) if select_by == "loss" else (metric, row["val_loss"])

    return key


def _validation_scores(
    deps: MethodDeps,
    method: str,
    engine: Engine,
    builder: PromptBuilder,
    users: list[User],
    modules: dict[str, dict[str, torch.Tensor]],
    decoding: str,
) -> dict:
    """Each user's best-epoch module answers their validation items, as the benchmark answers test items."""
    slots = SlotManager(engine.bank, loader=modules.__getitem__)
    golds, predictions, owners = [], [], []
    for start in range(0, len(users), slots.capacity):
        group = users[start : start + slots.capacity]
        with slots.pinned([u.id for u in group]) as slot_of:
            queries = [(user, example) for user in group for example in user.val]
            row_slots = [slot_of[user.id] for user, _ in queries]
            predictions += answer_examples(deps, method, engine, builder, queries, row_slots, decoding)
        golds += [
            gold_value({"gold": e.target, "golds": list(e.targets)}, deps.task.kind) for _, e in queries
        ]
        owners += [u.id for u, _ in queries]
    return metrics.score(deps.task.metrics, golds, predictions, owners, labels=deps.task.labels)
