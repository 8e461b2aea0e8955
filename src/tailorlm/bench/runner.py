"""The benchmark runner: every chosen method on the same test users, one task, results kept per user and
method the moment they exist, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from tailorlm.bench import report
from tailorlm.bench.results import write_results
from tailorlm.data import load_task
from tailorlm.data.schema import Task, User
from tailorlm.methods.context import BenchConfig, RunContext
from tailorlm.methods.decoding import check_decoding, default_decoding
from tailorlm.methods.registry import Method, resolve
from tailorlm.progress import Reporter

RUN_FILE = "run.json"
PREDICTIONS = "predictions"


class RunFolderError(ValueError):
    """The output folder holds a different run (other task, seed or users) than the one asked for."""


def _identity(task: Task, config: BenchConfig, ctx: RunContext) -> dict:
    """What must match for a folder's stored results to be continued."""
    return {
        "task": task.name,
        "source": task.source,
        "seed": config.seed,
        "model": config.model,
        "test_users": [u.id for u in ctx.test_users],
    }


def _method_record(method: Method, decoding: str) -> dict:
    return {
        "family": method.family,
        "description": method.description,
        "decoding": decoding,
        "personal": method.personal,
    }


def _write_run_file(
    out_dir: Path, task: Task, config: BenchConfig, ctx: RunContext, methods: dict[str, dict]
) -> None:
    path = out_dir / RUN_FILE
    identity = _identity(task, config, ctx)
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous is not None and previous.get("identity") != identity:
        raise RunFolderError(
            f"{out_dir} holds another run ({previous.get('identity', {}).get('task')}, "
            f"seed {previous.get('identity', {}).get('seed')}, or other users); "
            "choose another --out folder or delete this one"
        )
    record = {
        "task": {
            "name": task.name,
            "kind": task.kind,
            "labels": list(task.labels) if task.labels else None,
            "metrics": list(task.metrics),
            "source": task.source,
        },
        "config": asdict(config),
        "methods": {**(previous or {}).get("methods", {}), **methods},
        "users": {
            u.id: {
                "history": len(u.history),
                "train": len(task.training_examples(u)),
                "val": len(u.val),
                "test": len(u.test),
            }
            for u in ctx.test_users
        },
        "adapter_users": len(ctx.adapter_users),
        "identity": identity,
        "started": (previous or {}).get("started") or datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


def done_users(out_dir: Path, method_key: str) -> set[str]:
    path = out_dir / PREDICTIONS / f"{method_key}.jsonl"
    if not path.is_file():
        return set()
    users = set()
    for line in path.read_text().splitlines():
        try:
            users.add(json.loads(line)["user"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by a kill: that user simply runs again
    return users


def _append(out_dir: Path, method_key: str, user: User, predictions: list[str], seconds: float) -> None:
    if len(predictions) != len(user.test):
        raise RuntimeError(
            f"{method_key} gave {len(predictions)} answers for {len(user.test)} test items of {user.id}"
        )
    record = {
        "user": user.id,
        "seconds": seconds,
        "examples": [
            {"id": e.id, "gold": e.target, "golds": list(e.targets), "prediction": p}
            for e, p in zip(user.test, predictions, strict=True)
        ],
    }
    folder = out_dir / PREDICTIONS
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{method_key}.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")


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
) -> Path:
    """Run the methods, keep every user's predictions as they finish, then write results and the report."""
    config = config or BenchConfig()
    out_dir = Path(out_dir)
    task = load_task(task_name, data_dir=data_dir, split=split, seed=config.seed)
    chosen = resolve(task, methods)
    reporter = reporter or Reporter()
    ctx = RunContext(task, config, out_dir, reporter)
    if not ctx.test_users:
        raise ValueError(f"task {task.name} has no user with both training and test items")
    plan = []
    for method, override in chosen:
        decoding = _decoding_for(task, method, override, config)
        key = method.name if override is None else f"{method.name}@{decoding}"
        plan.append((key, method, decoding))
    _write_run_file(out_dir, task, config, ctx, {key: _method_record(m, d) for key, m, d in plan})
    reporter.log(
        f"{task.name}: {len(ctx.test_users)} test users, {len(ctx.adapter_users)} other users for the "
        f"task adapter; {len(plan)} methods -> {out_dir}"
    )
    for key, method, decoding in plan:
        _run_method(ctx, out_dir, key, method, decoding)
    if task.spec.family == "lamp":
        _write_lamp_outputs(task, out_dir, [key for key, _, _ in plan], reporter)
    results = write_results(out_dir)
    report.write_report(out_dir, results)
    return results


def _write_lamp_outputs(task: Task, out_dir: Path, keys: list[str], reporter: Reporter) -> None:
    """Each method's predictions in LaMP's outputs format, for LaMP's own evaluation script. LaMP requires
    every question of the split, so only methods that answered every user are written."""
    from tailorlm.data import lamp

    for key in keys:
        path = out_dir / PREDICTIONS / f"{key}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        predictions = {e["id"]: e["prediction"] for line in lines for e in line["examples"]}
        if len(predictions) < task.count("test"):
            reporter.log(
                f"{key}: LaMP outputs file skipped (answers {len(predictions)} of "
                f"{task.count('test')} questions; run with --full)"
            )
            continue
        lamp.write_predictions(task, predictions, out_dir / "lamp" / f"{key}.json")


def _run_method(ctx: RunContext, out_dir: Path, key: str, method: Method, decoding: str) -> None:
    finished = done_users(out_dir, key)
    pending = [u for u in ctx.test_users if u.id not in finished]
    if not pending:
        ctx.reporter.log(f"{key}: all {len(ctx.test_users)} users done already")
        return
    started = time.perf_counter()
    advance = ctx.reporter.progress(f"{key} ({decoding})")
    for done, (user, predictions, seconds) in enumerate(method.run(ctx, pending, decoding), start=1):
        _append(out_dir, key, user, predictions, seconds)
        advance(done, len(pending))
    ctx.reporter.log(f"{key}: {len(pending)} users in {time.perf_counter() - started:.0f} s")
    ctx.release()
