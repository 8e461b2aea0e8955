"""The benchmark runner: every chosen method on the same test users, one task, results kept per user and
method the moment they exist, so an interrupted run resumes where it stopped. Each method is scored as it
finishes (``results.json`` rewritten), and a method that fails, while running or at scoring, is reported
as failed with its reason while every other method runs and is reported.

The runner owns what makes it a benchmark run: the config, the split of users into test users and the
task adapter's users (``bench.config``), and the run folder (``bench.run_folder``). The methods get only
``MethodDeps`` built from those.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tailorlm.bench import budget, report
from tailorlm.bench.config import BenchConfig, split_users
from tailorlm.bench.results import write_results
from tailorlm.bench.run_folder import RunFolder, RunFolderError
from tailorlm.data import lamp, load_task
from tailorlm.data.schema import Task, User
from tailorlm.methods.decoding import check_decoding, default_decoding
from tailorlm.methods.deps import MethodDeps, base_loader
from tailorlm.methods.recipes import PromptTrace
from tailorlm.methods.registry import Method, resolve
from tailorlm.progress import Reporter
from tailorlm.train.jobs import LocalRunner, TrainRunner

__all__ = ["RunFolderError", "run"]


def _method_record(method: Method, decoding: str) -> dict:
    return {
        "family": method.family,
        "description": method.description,
        "decoding": decoding,
        "personal": method.personal,
        "uses_task_adapter": budget.uses_task_adapter(method),
    }


def _decoding_for(task: Task, method: Method, override: str | None, config: BenchConfig) -> str:
    if method.setup is None:
        return "rule"
    return check_decoding(task, override or config.decoding or default_decoding(task))


def run(
    task_name: str,
    out_dir: str | Path,
    methods: list[str] | None = None,
    config: BenchConfig | None = None,
    data_dir: str | Path | None = None,
    split: str | None = None,
    reporter: Reporter | None = None,
    trace: PromptTrace | None = None,
    estimate_work: bool = False,
    runner: TrainRunner | None = None,
) -> dict[str, Any]:
    """Run the methods, keep every user's predictions as they finish, then write results and the report;
    returns the results (as written to ``results.json``).
    ``trace``, when given, receives every prompt the methods build with what went into it; ``runner``
    decides where per-user modules train (default: this process).
    ``estimate_work`` (or a budget in ``config``) measures this machine and prints the run's estimated
    time first; over the budget, the run is capped (``bench.budget``)."""
    started = time.perf_counter()
    config = config or BenchConfig()
    folder = RunFolder(out_dir)
    task = load_task(task_name, data_dir=data_dir, split=split, seed=config.seed)
    reporter = reporter or Reporter()
    plan = []
    for method, override in resolve(task, methods):
        decoding = _decoding_for(task, method, override, config)
        key = method.name if override is None else f"{method.name}@{decoding}"
        plan.append((key, method, decoding))
    estimate, asked = None, config
    if estimate_work or config.budget_minutes is not None:
        config, estimate = _sized(folder, task, plan, config, reporter)
        plan = budget.kept(plan, config)
    test_users, adapter_users = split_users(task, config)
    if not test_users:
        raise ValueError(f"task {task.name} has no user with both training and test items")
    items_before_cap = budget.cap_training_items(task, test_users, config.user_examples, config.seed)
    deps = MethodDeps(
        task,
        base_loader(config.model, config.device, config.dtype),
        folder.modules,
        config.method_settings(),
        adapter_users=adapter_users,
        reporter=reporter,
        trace=trace,
        runner=runner or LocalRunner(),
        profile_cache=folder.profiles,
    )
    folder.write_run_file(
        task,
        config,
        test_users,
        adapter_users,
        {key: _method_record(m, d) for key, m, d in plan},
        items_before_cap,
    )
    if estimate is not None:
        folder.record_estimate(
            estimate.per_method,
            estimate.rates.measure_s,
            budget.cuts(asked, config),
            dataclasses.asdict(estimate.rates),
        )
    reporter.log(
        f"{task.name}: {len(test_users)} test users, {len(adapter_users)} other users for the "
        f"task adapter; {len(plan)} methods -> {folder.root}"
    )
    for key, method, decoding in plan:
        _run_and_score(deps, folder, test_users, key, method, decoding)
    if task.spec.family == "lamp":
        _write_lamp_outputs(task, folder, [key for key, _, _ in plan], reporter)
    folder.record_run_seconds(time.perf_counter() - started)
    results = write_results(folder.root)
    report.write_report(folder.root, results)
    for line in _timing_lines(results):
        reporter.log(line)
    return results


def _timing_lines(results: dict[str, Any]) -> list[str]:
    """Estimate against actual per method, printed at the end of a run."""
    timing = results.get("timing") or {}
    if not timing.get("estimated_seconds"):
        return []
    lines = [
        f"time: estimated {timing['estimated_seconds'] / 60:.1f} min, took "
        f"{(timing.get('run_seconds') or 0) / 60:.1f} min (measuring {timing['measure_seconds']:.0f} s)"
    ]
    for key, method in results["methods"].items():
        if not method.get("estimated_seconds") or not method.get("actual_seconds"):
            continue  # a rule baseline (no model, nothing estimated) or a method that did not run
        lines.append(
            f"time: {key}: estimated {method['estimated_seconds']:.0f} s, took "
            f"{method['actual_seconds']:.0f} s (estimate/actual {method['estimate_ratio']:.2f})"
        )
    return lines


def _sized(
    folder: RunFolder, task: Task, plan: list[budget.PlanEntry], config: BenchConfig, reporter: Reporter
) -> tuple[BenchConfig, budget.Estimate | None]:
    """``config`` within its budget, and its estimate, printed. A resumed run keeps the caps it started
    with (a new measurement could choose others, and the run's users must stay the same)."""
    previous = folder.recorded_config()
    if previous is not None and config.budget_minutes is not None:
        config = replace(
            config,
            test_users=previous.get("test_users"),
            user_examples=previous.get("user_examples"),
            adapter_examples=previous.get("adapter_examples"),
            left_out=tuple(previous.get("left_out") or ()),
        )
    test_users, adapter_users = split_users(task, config)
    if not test_users:
        return config, None
    deps = MethodDeps(
        task,
        base_loader(config.model, config.device, config.dtype),
        folder.modules,
        config.method_settings(),
        adapter_users=adapter_users,
    )
    rates = budget.measure(deps, plan, test_users)
    asked = budget.estimate(budget.kept(plan, config), task, test_users, adapter_users, config, rates)
    for line in asked.lines():
        reporter.log(f"{task.name}: {line}")
    fitted, estimate = config, asked
    if previous is None:
        fitted, estimate = budget.fit_budget(plan, task, config, rates)
        if fitted != config:
            reporter.log(
                f"{task.name}: over the {config.budget_minutes:g}-minute budget, so " + _caps(fitted)
            )
            reporter.log(f"{task.name}: {estimate.lines()[0]} (--budget to change it)")
        if estimate.seconds > (config.budget_minutes or math.inf) * 60:
            reporter.log(f"{task.name}: even capped, the run is estimated over its budget")
    del deps
    gc.collect()
    return fitted, estimate


def _caps(config: BenchConfig) -> str:
    said = f"capped at {config.test_users} test users"
    if config.user_examples is not None:
        said += f", {config.user_examples} training items per user"
    if config.adapter_examples is not None:
        said += f", {config.adapter_examples} task-adapter examples"
    if config.left_out:
        said += f", and left out {', '.join(config.left_out)} (each family it compares keeps a method)"
    return said


def _write_lamp_outputs(task: Task, folder: RunFolder, keys: list[str], reporter: Reporter) -> None:
    """Each method's predictions in LaMP's outputs format, for LaMP's own evaluation script. LaMP requires
    every question of the split, so only methods that answered every user are written."""

    for key in keys:
        predictions = folder.answers(key)
        if len(predictions) < task.count("test"):
            reporter.log(
                f"{key}: LaMP outputs file skipped (answers {len(predictions)} of "
                f"{task.count('test')} questions; run with --full)"
            )
            continue
        lamp.write_predictions(task, predictions, folder.lamp / f"{key}.json")


def _run_and_score(
    deps: MethodDeps, folder: RunFolder, test_users: list[User], key: str, method: Method, decoding: str
) -> None:
    """Run one method and score it at once, so a problem with its answers shows now, not after every
    other method has run; a failure of either kind is recorded and the run goes on."""
    try:
        _run_method(deps, folder, test_users, key, method, decoding)
    except Exception as error:  # one method's failure must not cost every other method its results
        deps.reporter.log(f"{key}: failed: {folder.record_failure(key, error)}")
        gc.collect()
        ran = False
    else:
        folder.clear_failure(key)
        ran = True
    # Rewritten after every method: a run killed later keeps the figures of what it finished.
    summary = write_results(folder.root)["methods"][key]
    if ran and summary["failed"] is not None:
        deps.reporter.log(f"{key}: failed at scoring: {summary['failed']}")
    elif ran and summary["has_results"]:
        primary = deps.task.metrics[0]
        deps.reporter.log(f"{key}: {primary} {summary['metrics'][primary]['user_mean']:.3f} (per-user mean)")


def _run_method(
    deps: MethodDeps, folder: RunFolder, test_users: list[User], key: str, method: Method, decoding: str
) -> None:
    finished = folder.done_users(key)
    pending = [u for u in test_users if u.id not in finished]
    if not pending:
        deps.reporter.log(f"{key}: all {len(test_users)} users done already")
        return
    started = time.perf_counter()
    advance = deps.reporter.progress(f"{key} ({decoding})")
    for done, (user, predictions, seconds) in enumerate(method.run(deps, pending, decoding), start=1):
        folder.append(key, user, predictions, seconds)
        advance(done, len(pending))
    took = time.perf_counter() - started
    folder.record_actual(key, took, len(pending))
    deps.reporter.log(f"{key}: {len(pending)} users in {took:.0f} s")
    # The method's engines (a base model copy each) are garbage once its generator is done: free them
    # before the next method loads its own.
    gc.collect()
