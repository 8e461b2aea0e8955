"""A benchmark run folder turned into statistics: per-method metrics, intervals over users and paired tests.

The runner writes ``run.json`` and one ``predictions/<method>.jsonl`` per method (one line per finished
user; a resumed run may repeat a user, and the last line wins), and ``failures.json`` for the methods that
failed while running. ``summarize`` reads them and ``write_results`` stores the outcome as ``results.json``
next to them. A method whose predictions cannot be read or scored, or that failed while running, is
reported as failed with its one-line reason; every other method is still scored. Users, not examples, are
the unit of every interval and test, because a personalization result has to hold for users the benchmark
did not see.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tailorlm import metrics
from tailorlm.files import atomic_write_text, json_text

RUN_FILE = "run.json"
PREDICTIONS_DIR = "predictions"
RESULTS_FILE = "results.json"
FAILURES_FILE = "failures.json"
TIMING_FILE = "timing.json"
SCHEMA_VERSION = 1

SEED = 0
CI_RESAMPLES = 1000
PAIRED_RESAMPLES = 10_000
LEVEL = 0.95
ALPHA = 0.05

# The method families a run.json names, simplest first (the order of the report's colours); distinct from
# the data source families in tailorlm.data.specs.
METHOD_FAMILIES: tuple[str, ...] = (
    "simple-baseline",
    "non-personal",
    "prompt-personal",
    "parameter-personal",
    "shared-personal",
    "oppu",
)
NON_PERSONAL_FAMILY = "non-personal"
BASELINE_FAMILY = "simple-baseline"
PROMPT_FAMILY = "prompt-personal"
# Simple baselines that use nothing about the user; every other baseline reads the user's own labels.
NOT_PERSONAL_METHODS: frozenset[str] = frozenset({"item-majority"})
# Every method is tested against the best of each: the personal modules must beat the strongest way to
# personalize without training anything per user, not only the model that knows nothing of the user.
REFERENCES: dict[str, str] = {
    "non_personal": NON_PERSONAL_FAMILY,
    "simple_baseline": BASELINE_FAMILY,
    "prompt_personal": PROMPT_FAMILY,
}


class ReportError(ValueError):
    """A run folder that cannot be read: the message names the file (and line) and the problem."""


# --- reading the run folder --------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ReportError(f"{path}: not found (is this a benchmark run folder?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from None


def _need(mapping: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ReportError(f"{where}: {key!r} is missing or not a {names}")
    return value


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` checked for what the statistics need: task name and kind, methods and users."""
    path = Path(run_dir) / RUN_FILE
    run = _read_json(path)
    if not isinstance(run, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(run).__name__}")
    task = _need(run, "task", dict, str(path))
    _need(task, "name", str, f"{path}, task")
    kind = _need(task, "kind", str, f"{path}, task")
    if kind not in metrics.KIND_METRICS:
        raise ReportError(f"{path}, task: unknown kind {kind!r}; known: {', '.join(metrics.KIND_METRICS)}")
    names = task.get("metrics") or list(metrics.KIND_METRICS[kind])
    unknown = [n for n in names if n not in metrics.ALL_METRICS] if isinstance(names, list) else [names]
    if unknown:
        raise ReportError(
            f"{path}, task: unknown metric(s) {unknown}; known: {', '.join(metrics.ALL_METRICS)}"
        )
    labels = task.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise ReportError(f"{path}, task: 'labels' must be a list of strings or null")
    for name, entry in _need(run, "methods", dict, str(path)).items():
        if not isinstance(entry, dict):
            raise ReportError(f"{path}, method {name!r}: expected an object")
    users = run.setdefault("users", {})
    if not isinstance(users, dict):
        raise ReportError(f"{path}: 'users' must be an object")
    for user, entry in users.items():
        if not isinstance(entry, dict):
            raise ReportError(f"{path}, user {user!r}: expected an object with history/train/val/test counts")
    return {**run, "task": {**task, "metrics": list(names)}}


def _check_line(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ReportError(f"{where}: expected a JSON object, found {type(record).__name__}")
    user = record.get("user")
    if not isinstance(user, str | int) or isinstance(user, bool) or str(user) == "":
        raise ReportError(f"{where}: 'user' is missing or not a string")
    seconds = record.get("seconds", 0.0)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        raise ReportError(f"{where}: 'seconds' is not a number")
    examples = _need(record, "examples", list, where)
    for index, example in enumerate(examples):
        _check_example(example, f"{where}, example {index}")
    return {"user": str(user), "seconds": float(seconds), "examples": examples}


def _check_example(example: Any, where: str) -> None:
    if not isinstance(example, dict):
        raise ReportError(f"{where}: expected a JSON object")
    golds = example.get("golds")
    if not isinstance(example.get("gold"), str) and not (
        isinstance(golds, list) and golds and all(isinstance(g, str) for g in golds)
    ):
        raise ReportError(f"{where}: needs 'gold' (a string) or 'golds' (a list of strings)")
    prediction = example.get("prediction")
    if prediction is not None and not isinstance(prediction, str | int | float):
        raise ReportError(f"{where}: 'prediction' must be text or null")


def read_predictions(path: str | Path) -> dict[str, dict[str, Any]]:
    """One method's lines by user, in file order; a user written again (a resumed run) keeps its last line."""
    path = Path(path)
    by_user: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if not line.endswith("\n"):
                    break  # only the last line can lack its newline: cut short by a kill, a user not done
                raise ReportError(f"{where}: not valid JSON ({error.msg})") from None
            checked = _check_line(record, where)
            by_user.pop(checked["user"], None)  # re-insert so the order follows the last write
            by_user[checked["user"]] = checked
    return by_user


def read_failures(run_dir: str | Path) -> dict[str, str]:
    """The one-line reason of each method that failed while running (``failures.json``, written by the
    runner's ``RunFolder``), by method key."""
    path = Path(run_dir) / FAILURES_FILE
    if not path.is_file():
        return {}
    failures = _read_json(path)
    if not isinstance(failures, dict):
        raise ReportError(f"{path}: expected a JSON object of methods")
    return {
        str(name): str(entry.get("reason", "")) if isinstance(entry, dict) else str(entry)
        for name, entry in failures.items()
    }


def read_timing(run_dir: str | Path) -> dict[str, Any]:
    """``timing.json`` (written by the runner's ``RunFolder``): the work estimate, the budget's cuts and
    what each method took; empty for a run that made no estimate."""
    path = Path(run_dir) / TIMING_FILE
    if not path.is_file():
        return {}
    timing = _read_json(path)
    if not isinstance(timing, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return timing


def _timing_summary(name: str, timing: Mapping[str, Any]) -> dict[str, Any]:
    """A method's estimated and actual seconds and their ratio (estimate / actual)."""
    estimated = (timing.get("estimate") or {}).get(name)
    actual = ((timing.get("actual") or {}).get(name) or {}).get("seconds")
    ratio = estimated / actual if estimated is not None and actual else None
    return {"estimated_seconds": estimated, "actual_seconds": actual, "estimate_ratio": ratio}


def _cut_notes(entry: Mapping[str, Any], run: Mapping[str, Any], timing: Mapping[str, Any]) -> list[str]:
    """What the budget's caps took from this method: the users' training items (every method that reads
    a test user's own data), the task adapter's examples (every method that stands on it)."""
    notes = []
    users = run["users"]
    before = {u: e["train_before_cap"] for u, e in users.items() if "train_before_cap" in e}
    if before and entry.get("personal", True):
        cap = run.get("config", {}).get("user_examples")
        kept = sum(users[u]["train"] for u in before)
        notes.append(
            f"training items cut to {cap} per user ({len(before)} of {len(users)} users; "
            f"{kept} of {sum(before.values())} of their items kept)"
        )
    adapter = (timing.get("budget_cuts") or {}).get("adapter_examples")
    if adapter and entry.get("uses_task_adapter"):
        notes.append(f"task adapter cut to {adapter[1]} examples (asked {adapter[0] or 'all'})")
    return notes


# --- per-method statistics ---------------------------------------------------------------------------------


def is_personal(name: str, entry: Mapping[str, Any]) -> bool:
    """A method is personal when it uses anything of the user's own; the run may say so explicitly."""
    if isinstance(entry.get("personal"), bool):
        return entry["personal"]
    return entry.get("family") != NON_PERSONAL_FAMILY and name not in NOT_PERSONAL_METHODS


def gold_value(example: Mapping[str, Any], kind: str) -> metrics.Gold:
    golds = example.get("golds")
    # Several references are one gold text to ROUGE, but a set of accepted labels to the label metrics.
    if kind != "generation" and isinstance(golds, list) and golds:
        return tuple(golds)
    gold = example.get("gold")
    return gold if isinstance(gold, str) else golds[0]


def _score(
    task: Mapping[str, Any], lines: Mapping[str, Mapping[str, Any]], file: Path
) -> dict[str, Any] | None:
    golds, preds, users = [], [], []
    for user, line in lines.items():
        for example in line["examples"]:
            golds.append(gold_value(example, task["kind"]))
            prediction = example.get("prediction")
            preds.append(None if prediction is None else str(prediction))
            users.append(user)
    if not golds:
        return None
    try:
        return metrics.score(task["metrics"], golds, preds, users, labels=task.get("labels"))
    except ValueError as error:
        raise ReportError(f"{file}: cannot score the predictions: {error}") from None


def _metric_summary(scored: Mapping[str, Any], name: str) -> dict[str, float]:
    low, high = metrics.bootstrap_ci(
        scored["per_user"][name], n_resamples=CI_RESAMPLES, seed=SEED, level=LEVEL
    )
    return {
        "user_mean": scored["user_mean"][name],
        "ci_low": low,
        "ci_high": high,
        "pooled": scored["pooled"][name],
    }


def _method_summary(
    name: str,
    entry: Mapping[str, Any],
    run: Mapping[str, Any],
    run_dir: Path,
    failed: str | None = None,
    timing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One method's figures; ``failed`` is why it stopped while running. Predictions that cannot be read or
    scored fail this method alone: the others are still scored and reported."""
    file = run_dir / PREDICTIONS_DIR / f"{name}.jsonl"
    try:
        lines = read_predictions(file) if file.is_file() else {}
        scored = _score(run["task"], lines, file)
    except ReportError as error:
        lines, scored = {}, None
        failed = f"{failed}; and {error}" if failed else str(error)
    expected = list(run["users"])
    done = [u for u in expected if u in lines]
    return {
        "failed": failed,
        "family": str(entry.get("family", "unknown")),
        "decoding": str(entry.get("decoding", "unknown")),
        "description": str(entry.get("description", "")),
        "personal": is_personal(name, entry),
        "predictions_file": str(file.relative_to(run_dir)) if file.is_file() else None,
        "users_expected": len(expected),
        "users_done": len(done),
        "missing_users": [u for u in expected if u not in lines],
        "extra_users": [u for u in lines if u not in run["users"]],
        "complete": len(done) == len(expected),
        "has_results": scored is not None,
        "n_users": scored["n_users"] if scored else 0,
        "n_examples": scored["n_examples"] if scored else 0,
        "seconds": float(sum(line["seconds"] for line in lines.values())),
        **_timing_summary(name, timing or {}),
        "cuts": _cut_notes(entry, run, timing or {}),
        "metrics": {m: _metric_summary(scored, m) for m in scored["metrics"]} if scored else {},
        "per_user": scored["per_user"] if scored else {},
    }


# --- comparisons on the primary metric ---------------------------------------------------------------------


def _sort_key(lower_is_better: bool, primary: str):
    def key(item: tuple[str, Mapping[str, Any]]) -> tuple[int, float, str]:
        name, method = item
        if not method["has_results"]:
            return (1, 0.0, name)
        value = method["metrics"][primary]["user_mean"]
        return (0, value if lower_is_better else -value, name)

    return key


def ranking(methods: Mapping[str, Mapping[str, Any]], primary: str, lower_is_better: bool) -> list[str]:
    """Method names best first on the primary metric's per-user mean; methods without results last."""
    return [name for name, _ in sorted(methods.items(), key=_sort_key(lower_is_better, primary))]


def _best_of(family: str, methods: Mapping[str, Mapping[str, Any]], order: list[str]) -> str | None:
    return next((n for n in order if methods[n]["family"] == family and methods[n]["has_results"]), None)


def compare(
    method: Mapping[str, float], reference: Mapping[str, float], lower_is_better: bool
) -> dict[str, Any]:
    """Paired bootstrap of one method against a reference over the users both have.

    ``delta`` is method minus reference in the metric's units; ``gain`` is the same turned so that positive
    means better; ``p_value`` is one-sided (the method is better), so ``significant`` means it beats the
    reference.
    """
    common = sorted(set(method) & set(reference))
    if not common:
        return {"status": "no-common-users", "n_users": 0}
    a = {u: method[u] for u in common}
    b = {u: reference[u] for u in common}
    p_value = metrics.paired_bootstrap(
        a, b, n_resamples=PAIRED_RESAMPLES, seed=SEED, lower_is_better=lower_is_better
    )
    method_mean, reference_mean = float(np.mean(list(a.values()))), float(np.mean(list(b.values())))
    delta = method_mean - reference_mean
    return {
        "status": "compared",
        "n_users": len(common),
        "method_mean": method_mean,
        "reference_mean": reference_mean,
        "delta": delta,
        "gain": -delta if lower_is_better else delta,
        "p_value": p_value,
        "significant": p_value < ALPHA,
    }


def _comparison(
    name: str, reference: str | None, methods: Mapping[str, Mapping[str, Any]], primary: str, lower: bool
) -> dict[str, Any]:
    if reference is None:
        return {"reference": None, "status": "missing"}
    if reference == name:
        return {"reference": reference, "status": "self"}
    if not methods[name]["has_results"]:
        return {"reference": reference, "status": "no-results"}
    own, theirs = methods[name]["per_user"][primary], methods[reference]["per_user"][primary]
    return {"reference": reference, **compare(own, theirs, lower)}


def user_gains(
    method: Mapping[str, float],
    reference: Mapping[str, float],
    users: Mapping[str, Mapping[str, Any]],
    lower_is_better: bool,
) -> list[dict[str, Any]]:
    """Each shared user's gain over the reference (positive = better) with the size of their history."""
    sign = -1.0 if lower_is_better else 1.0
    return [
        {"user": u, "history": users.get(u, {}).get("history"), "gain": sign * (method[u] - reference[u])}
        for u in sorted(set(method) & set(reference))
    ]


def _warnings(run: Mapping[str, Any], methods: Mapping[str, Mapping[str, Any]], run_dir: Path) -> list[str]:
    notes = []
    folder = run_dir / PREDICTIONS_DIR
    stray = (
        sorted(p.stem for p in folder.glob("*.jsonl") if p.stem not in run["methods"])
        if folder.is_dir()
        else []
    )
    if stray:
        notes.append(f"predictions for methods not listed in {RUN_FILE} were left out: {', '.join(stray)}")
    for name, method in methods.items():
        if method["failed"]:
            notes.append(f"{name}: failed: {method['failed']}")
        elif method["predictions_file"] is None:
            notes.append(f"{name}: no predictions file yet")
        elif not method["complete"]:
            notes.append(f"{name}: partial, {method['users_done']} of {method['users_expected']} users done")
        if method["extra_users"]:
            notes.append(
                f"{name}: {len(method['extra_users'])} user(s) not listed in {RUN_FILE} were scored too"
            )
    return notes


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """Every figure the report shows, computed from the run folder (deterministic: fixed seeds)."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    task = run["task"]
    primary = task["metrics"][0]
    lower = primary in metrics.LOWER_IS_BETTER
    failures = read_failures(run_dir)
    timing = read_timing(run_dir)
    methods = {
        name: _method_summary(name, entry, run, run_dir, failures.get(name), timing)
        for name, entry in run["methods"].items()
    }
    order = ranking(methods, primary, lower)
    references = {key: _best_of(family, methods, order) for key, family in REFERENCES.items()}
    for name, method in methods.items():
        method["comparisons"] = {
            key: _comparison(name, ref, methods, primary, lower) for key, ref in references.items()
        }
        ref = references["non_personal"]
        has_pair = ref is not None and ref != name and method["has_results"]
        method["gain_vs_non_personal"] = (
            user_gains(method["per_user"][primary], methods[ref]["per_user"][primary], run["users"], lower)
            if has_pair
            else []
        )
    return {
        "schema": SCHEMA_VERSION,
        "task": task,
        "config": run.get("config", {}),
        "started": run.get("started"),
        "primary_metric": primary,
        "lower_is_better": lower,
        "metrics": task["metrics"],
        "users_in_run": len(run["users"]),
        # Each test user's counts as the runner recorded them (history, train after any cap, val, test): the
        # report's table by activity reads "train". A results.json from before this key has none.
        "users": run["users"],
        "statistics": {
            "unit": "user",
            "seed": SEED,
            "ci_resamples": CI_RESAMPLES,
            "ci_level": LEVEL,
            "paired_resamples": PAIRED_RESAMPLES,
            "alpha": ALPHA,
            "test": "one-sided paired bootstrap over shared users",
        },
        "ranking": order,
        "references": references,
        "timing": _run_timing(timing),
        "methods": methods,
        "warnings": _warnings(run, methods, run_dir),
    }


def _run_timing(timing: Mapping[str, Any]) -> dict[str, Any]:
    """The run's estimated seconds (measuring included) against its wall time, and the budget's cuts."""
    estimate = timing.get("estimate")
    measured = float(timing.get("measure_seconds") or 0.0)
    return {
        "measure_seconds": measured if estimate is not None else None,
        "estimated_seconds": measured + sum(estimate.values()) if estimate is not None else None,
        "run_seconds": timing.get("run_seconds"),
        "budget_cuts": timing.get("budget_cuts") or {},
    }


def write_results(run_dir: str | Path) -> dict[str, Any]:
    """``summarize`` the folder and store it as ``results.json`` there; returns what was written."""
    results = summarize(run_dir)
    path = Path(run_dir) / RESULTS_FILE
    atomic_write_text(path, json_text(results) + "\n")
    return results
