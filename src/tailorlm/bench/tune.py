"""Choosing a module recipe on validation data: train a sample of users with each candidate learning rate
and compare their best validation loss (the loss PEFT-U picks epochs by). Test items are never read."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tailorlm import console
from tailorlm.data import load_task
from tailorlm.engine.train import MultiUserTrainer, TrainConfig, UserData
from tailorlm.methods.context import BenchConfig, RunContext
from tailorlm.methods.registry import methods_for
from tailorlm.methods.setups import PersonalSetup


def tune(
    task_name: str,
    method: str,
    learning_rates: Sequence[float],
    users: int = 8,
    epochs: int = 2,
    config: BenchConfig | None = None,
    progress: bool = True,
) -> dict:
    """Mean (over users) of each user's best validation loss, per learning rate, for a per-user method."""
    config = config or BenchConfig()
    task = load_task(task_name, seed=config.seed)
    chosen = methods_for(task).get(method)
    if chosen is None or not isinstance(chosen.setup, PersonalSetup):
        personal = [m.name for m in methods_for(task).values() if isinstance(m.setup, PersonalSetup)]
        raise ValueError(f"{method!r} is not a per-user module method; choose one of {', '.join(personal)}")
    ctx = RunContext(task, config, out_dir=_scratch())
    # Users outside the benchmark's test sample, so tuning and testing never share a user.
    sample = [u for u in ctx.adapter_users if u.val][:users]
    if not sample:
        raise ValueError(f"task {task.name} has no users with validation items to tune on")
    rows = []
    for rate in learning_rates:
        engine = chosen.setup.build_engine(ctx, chosen.recipe)
        builder = ctx.builder(chosen.recipe, engine.tokenizer)
        jobs = [
            UserData(u.id, builder.pairs(u, task.training_examples(u)), builder.pairs(u, u.val))
            for u in sample
        ]
        train_config = TrainConfig(
            epochs=epochs,
            batch_size=config.batch_size,
            learning_rate=rate,
            seed=config.seed,
            users_per_step=config.users_per_step,
        )
        results = MultiUserTrainer(engine, train_config).run(jobs, progress=progress)
        best = [min(r.val_losses) for r in results]
        rows.append(
            {
                "learning_rate": rate,
                "val_loss": statistics.fmean(best),
                "users": len(best),
                "best_epoch": statistics.fmean(r.best_epoch for r in results),
            }
        )
        console.err.print(f"{method} lr={rate:g}: mean best validation loss {rows[-1]['val_loss']:.4f}")
        del engine
        ctx.release()
    best_row = min(rows, key=lambda r: r["val_loss"])
    return {
        "task": task.name,
        "method": method,
        "epochs": epochs,
        "users": [u.id for u in sample],
        "candidates": rows,
        "best_learning_rate": best_row["learning_rate"],
    }


def _scratch() -> Path:
    # Task adapters that OPPU needs are trained here once per tuning call, never mixed with a run's folder.
    return Path(tempfile.mkdtemp(prefix="tailorlm-tune-"))
