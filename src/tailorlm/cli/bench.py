"""`tailorlm bench`: run personalization methods on a task's users and write the report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.markup import escape

from tailorlm import models
from tailorlm.bench.config import QUICK, QUICK_BUDGET_MINUTES
from tailorlm.cli import app, console
from tailorlm.cli.common import (
    BACKEND_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    GROUP_USERS_OPTION,
    JSON_OPTION,
    MODEL_OPTION,
    RAY_ADDRESS_OPTION,
    WORKERS_OPTION,
    user_errors,
)
from tailorlm.cluster.session import ClusterError
from tailorlm.cluster.training import runner_for
from tailorlm.data import DataError, load_task
from tailorlm.engine.bank import EngineError
from tailorlm.methods.registry import default_methods, methods_for


def _split_names(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


@app.command("bench")
def bench_command(
    task: str = typer.Option("verbagg", "--task", "-t", help="Task name (see `tailorlm data list`)."),
    methods: str | None = typer.Option(
        None,
        "--methods",
        help="Comma-separated methods (see `tailorlm methods`), 'name@DECODING' to decode one method "
        "another way (see --decoding), or 'all'. Default: every family, sized for the quick profile.",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run folder (default runs/TASK-quick or -full)."
    ),
    full: bool = typer.Option(False, "--full", help="Every user instead of the quick seeded sample."),
    test_users: int | None = typer.Option(None, "--test-users", min=1, help="How many users to test on."),
    data: Path | None = typer.Option(
        None, "--data", help="Folder with PEFT-U or LaMP files, for those tasks."
    ),
    split: str | None = typer.Option(
        None,
        "--split",
        help="LaMP split to test on (e.g. dev); or 'items' for an offline task or your own table: a share of "
        "the items held out for every user, so the test items are new to every method.",
    ),
    model: str | None = MODEL_OPTION,
    device: str | None = DEVICE_OPTION,
    dtype: str | None = DTYPE_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed for the user sample, splits, training and sampling."),
    decoding: str | None = typer.Option(
        None,
        "--decoding",
        help="likelihood (the label of the highest log-likelihood), calibrated (likelihood against the "
        "label prior of the prompt with the query blanked), median (of the label distribution; ordered "
        "labels) or generate (default: likelihood for label tasks; 'choice' is likelihood's former name).",
    ),
    epochs: int = typer.Option(QUICK.epochs, "--epochs", min=1, help="Epochs of each per-user module."),
    k: int = typer.Option(QUICK.k, "--k", min=1, help="History items retrieved into the prompt."),
    adapter_users: int | None = typer.Option(
        None, "--adapter-users", min=0, help="Other users the task adapter trains on (quick: 64; 0: all)."
    ),
    adapter_examples: int | None = typer.Option(
        None,
        "--adapter-examples",
        min=0,
        help="Cap on the task adapter's (shared model's) training examples (quick: 256; 0: all of them).",
    ),
    budget: float | None = typer.Option(
        None,
        "--budget",
        min=0,
        help=f"Minutes a run may take on this machine (quick runs: {QUICK_BUDGET_MINUTES:g} unless given; "
        "--full: none unless given; 0: none). The work is estimated first by timing the methods' own calls; "
        "over the budget, the test users are cut first, then each test user's training items, then the task "
        "adapter's examples, and the report says so in the rows they touch.",
    ),
    backend: str = BACKEND_OPTION,
    workers: int | None = WORKERS_OPTION,
    group_users: int | None = GROUP_USERS_OPTION,
    ray_address: str | None = RAY_ADDRESS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Benchmark personalization methods on one task; resumes an interrupted run in the same --out."""
    from tailorlm.bench import runner
    from tailorlm.bench.report.tables import failed_methods, timing_rows
    from tailorlm.bench.results import ReportError
    from tailorlm.bench.run_folder import RunFolderError
    from tailorlm.cli.report_table import console_table

    config = dataclasses.replace(
        QUICK, model=model, device=device, dtype=dtype, seed=seed, decoding=decoding, epochs=epochs, k=k
    )
    config = config.full() if full else config
    minutes = budget if budget is not None else (None if full else QUICK_BUDGET_MINUTES)
    config = dataclasses.replace(config, budget_minutes=minutes or None)
    if test_users is not None:
        config = dataclasses.replace(config, test_users=test_users)
    if adapter_users is not None:
        config = dataclasses.replace(config, adapter_users=adapter_users or None)
    if adapter_examples is not None:
        config = dataclasses.replace(config, adapter_examples=adapter_examples or None)
    out = out or Path("runs") / f"{task.replace(':', '-')}-{'full' if full else 'quick'}"
    with (
        user_errors(
            DataError,
            RunFolderError,
            models.ModelNotFoundError,
            EngineError,
            ValueError,
            ReportError,
            ClusterError,
        ),
        runner_for(backend, group_users, workers, ray_address) as training,
    ):
        results = runner.run(
            task,
            out,
            _split_names(methods),
            config,
            data_dir=data,
            split=split,
            reporter=console.ConsoleReporter(visible=not as_json),
            estimate_work=True,
            runner=training,
        )

    def render(_: dict) -> None:
        console.out.print(console_table(results))
        headers, rows = timing_rows(results)
        if rows:
            console.out.print(console.table("time: estimate against actual", headers, rows))
        console.out.print(f"report: {out / 'report.html'}", highlight=False)

    console.emit(results, as_json, render)
    failed = failed_methods(results)
    for name, reason in failed.items():
        console.err.print(f"[bold red]failed:[/] {escape(name)}: {escape(reason)}", highlight=False)
    if failed:
        # The report holds every other method; the exit code tells a script that this run is not whole.
        raise typer.Exit(1)


@app.command("methods")
def methods_command(
    task: str = typer.Option("verbagg", "--task", "-t", help="Task name."),
    data: Path | None = typer.Option(None, "--data", help="Folder with PEFT-U or LaMP files."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List the methods that apply to a task, with their family and whether they run by default."""
    with user_errors(DataError):
        loaded = load_task(task, data_dir=data)
    defaults = set(default_methods(loaded))
    payload = {
        "task": loaded.name,
        "methods": [
            {"name": m.name, "family": m.family, "default": m.name in defaults, "description": m.description}
            for m in methods_for(loaded).values()
        ],
    }

    def render(data: dict) -> None:
        rows = [
            (m["name"], m["family"], "yes" if m["default"] else "", m["description"]) for m in data["methods"]
        ]
        console.out.print(
            console.table(f"methods for {data['task']}", ["method", "family", "default", "what"], rows)
        )

    console.emit(payload, as_json, render)


@app.command("tune")
def tune_command(
    method: str = typer.Argument(..., help="A per-user method, e.g. peft-lora, peft-ia3, oppu."),
    task: str = typer.Option("verbagg", "--task", "-t", help="Task name, or a task file with --data."),
    data: Path | None = typer.Option(
        None, "--data", help="PEFT-U or LaMP files, or your own table (as in bench)."
    ),
    split: str | None = typer.Option(None, "--split", help="As in bench: a LaMP split, or 'items'."),
    learning_rates: str = typer.Option("1e-4,3e-4,1e-3,3e-3", "--lrs", help="Comma-separated candidates."),
    users: int = typer.Option(
        8, "--users", min=1, help="Users to tune on (never test users nor the task adapter's)."
    ),
    epochs: int = typer.Option(2, "--epochs", min=1, help="Most epochs per user (best epoch kept)."),
    test_users: int = typer.Option(
        QUICK.test_users,
        "--test-users",
        min=1,
        help="Size of the bench run's test sample, whose users are left out.",
    ),
    select_by: str = typer.Option(
        "metric", "--select-by", help="metric (the task's first metric on validation items) or loss."
    ),
    decoding: str | None = typer.Option(
        None, "--decoding", help="As in bench: likelihood, calibrated, median, generate."
    ),
    model: str | None = MODEL_OPTION,
    device: str | None = DEVICE_OPTION,
    dtype: str | None = DTYPE_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed of the user sample and training."),
    backend: str = BACKEND_OPTION,
    workers: int | None = WORKERS_OPTION,
    group_users: int | None = GROUP_USERS_OPTION,
    ray_address: str | None = RAY_ADDRESS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Pick a learning rate for a per-user method on validation items (test items are never read)."""
    from tailorlm.bench.tune import tune

    with (
        user_errors(DataError, models.ModelNotFoundError, EngineError, ValueError, ClusterError),
        runner_for(backend, group_users, workers, ray_address) as training,
    ):
        try:
            rates = [float(x) for x in learning_rates.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--lrs must be comma-separated numbers, got {learning_rates!r}") from None
        if not rates or any(rate <= 0 for rate in rates):
            raise ValueError(f"--lrs needs at least one positive learning rate, got {learning_rates!r}")
        result = tune(
            task,
            method,
            rates,
            users=users,
            epochs=epochs,
            config=dataclasses.replace(
                QUICK,
                model=model,
                device=device,
                dtype=dtype,
                seed=seed,
                test_users=test_users,
                decoding=decoding,
            ),
            select_by=select_by,
            reporter=console.ConsoleReporter(visible=not as_json),
            runner=training,
            data_dir=data,
            split=split,
        )

    def render(data: dict) -> None:
        rows = [
            (
                f"{r['learning_rate']:g}",
                r["val_loss"],
                r["val_metric"],
                r["best_epoch"],
                "<- chosen" if r["learning_rate"] == data["best_learning_rate"] else "",
            )
            if "diverged" not in r
            else (f"{r['learning_rate']:g}", "-", "-", "-", f"diverged ({r['diverged']}/{r['users']} users)")
            for r in data["candidates"]
        ]
        direction = "lower" if data["lower_is_better"] else "higher"
        title = (
            f"{data['method']} on {data['task']}: means over {len(data['users'])} validation users "
            f"({data['metric']}: {direction} is better; {data['decoding']} decoding; "
            f"chosen by {data['select_by']})"
        )
        headers = ["learning rate", "val loss", f"val {data['metric']}", "best epoch", ""]
        console.out.print(console.table(title, headers, rows))

    console.emit(result, as_json, render)
