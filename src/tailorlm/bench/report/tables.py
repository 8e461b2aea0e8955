"""The report's tables and the cell formatting every rendering shares (markdown, HTML and the console).

``results`` is what ``tailorlm.bench.results.summarize`` returns. Each table comes as ``(headers, rows)``,
rows as lists of already formatted strings, so each renderer only lays them out and none formats a number
differently from another.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tailorlm import metrics
from tailorlm.bench.results import ALPHA, LEVEL

# The results.json dict: {"task", "metrics", "primary_metric", "ranking", "references", "methods", ...}.
Results = Mapping[str, Any]

# The keys of results["references"] the report compares with, and how a sentence names each.
REFERENCE_TITLES: dict[str, str] = {
    "non_personal": "the best non-personal method",
    "simple_baseline": "the best simple baseline",
    "prompt_personal": "the best prompt-side personal method",
}


# Differences the users-needed table sizes the test for besides the observed one, per metric: on LaMP's
# generation tasks the published margins of personal over shared models are about 0.01-0.02 ROUGE.
DETECTABLE_DIFFERENCES: dict[str, tuple[float, ...]] = {"rouge1": (0.01, 0.02), "rougeL": (0.01, 0.02)}
POWER = 0.8  # the chance the users-needed table sizes the test for


# --- cells -------------------------------------------------------------------------------------------------


def num(value: float | None, digits: int = 3) -> str:
    """A number for a cell; ``None`` (no value) becomes "-"."""
    return "-" if value is None else f"{value:.{digits}f}"


def signed(value: float, digits: int = 3) -> str:
    """A difference with its sign, e.g. "+0.300"; one that rounds to zero is "+0.000", never "-0.000"."""
    return f"{round(value, digits) + 0.0:+.{digits}f}"  # + 0.0 turns a rounded -0.0 into 0.0


def sense(results: Results) -> str:
    """Which way the primary metric improves, as the tables and plots spell it."""
    return "lower is better" if results["lower_is_better"] else "higher is better"


def scored_methods(results: Results) -> list[str]:
    """The methods with results, best first (the ranking without the methods that have none)."""
    return [name for name in results["ranking"] if results["methods"][name]["has_results"]]


def _state(method: Mapping[str, Any]) -> str | None:
    """What a method's name is marked with: failed (its reason is in the notes), partial (not every user
    done), or nothing (None) when it is complete."""
    if method.get("failed"):
        return "failed"
    return None if method["complete"] else "partial"


def method_label(results: Results, name: str) -> str:
    """A method's name, marked " (failed)" or " (partial)" when it did not finish every user."""
    state = _state(results["methods"][name])
    return name if state is None else f"{name} ({state})"


def users_cell(method: Mapping[str, Any]) -> str:
    """Users done out of expected, e.g. "20/30 (partial)" or "0/30 (failed)", and what the time budget
    cut from the method ("8/8; training items cut to 16 per user (...)"), so the row says so."""
    done = f"{method['users_done']}/{method['users_expected']}"
    state = _state(method)
    cell = done if state is None else f"{done} ({state})"
    return "; ".join([cell, *method.get("cuts", [])])


def failed_methods(results: Results) -> dict[str, str]:
    """Each failed method's one-line reason, in the run's order."""
    return {name: m["failed"] for name, m in results["methods"].items() if m.get("failed")}


def _ci_cell(summary: Mapping[str, float]) -> str:
    return f"{num(summary['user_mean'])} [{num(summary['ci_low'])}, {num(summary['ci_high'])}]"


def p_text(value: float) -> str:
    """A p-value as "p=0.123", or "p<0.001" below that."""
    # The bootstrap p-value has a floor of 1/(resamples + 1): below 0.001 its digits say nothing more.
    return "p<0.001" if value < 0.001 else f"p={value:.3f}"


def delta_p(comparison: Mapping[str, Any]) -> str:
    """A compared method's "+0.300, p<0.001": delta is method minus reference."""
    return f"{comparison['delta']:+.3f}, {p_text(comparison['p_value'])}"


def comparison_cell(comparison: Mapping[str, Any]) -> str:
    """One comparison with a reference: delta, p and the verdict, or why there is none."""
    status = comparison["status"]
    if status == "compared":
        verdict = "significant" if comparison["significant"] else "not significant"
        return f"{delta_p(comparison)}, {verdict} (n={comparison['n_users']})"
    return {
        "self": "(reference)",
        "missing": "no reference",
        "no-results": "no results",
        "no-common-users": "no shared users",
    }.get(status, status)


def _beats(comparison: Mapping[str, Any]) -> str:
    if comparison["status"] != "compared":
        return "-"
    return "yes" if comparison["significant"] else "no"


# --- tables ------------------------------------------------------------------------------------------------


def method_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """The methods table, best first: family, decoding, each metric's per-user mean [CI] and pooled value,
    users done and seconds."""
    headers = ["#", "method", "family", "decoding"]
    for name in results["metrics"]:
        headers += [f"{name} (user mean [{LEVEL:.0%} CI])", f"{name} pooled"]
    headers += ["users", "examples", "seconds"]
    rows = []
    for rank, name in enumerate(results["ranking"], start=1):
        method = results["methods"][name]
        row = [str(rank) if method["has_results"] else "-", method_label(results, name), method["family"]]
        row.append(method["decoding"])
        for metric in results["metrics"]:
            summary = method["metrics"].get(metric)
            row += [_ci_cell(summary), num(summary["pooled"])] if summary else ["-", "-"]
        row += [users_cell(method), str(method["n_examples"]), num(method["seconds"], 1)]
        rows.append(row)
    return headers, rows


def timing_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Per method that runs a model: the work estimate made before the run, the seconds it took, their
    ratio; then the whole run (measuring, scoring and the rule baselines included). No rows for a run
    that made no estimate."""
    headers = ["method", "estimated s", "actual s", "estimate / actual"]
    timing = results.get("timing") or {}
    if timing.get("estimated_seconds") is None:
        return headers, []
    rows = []
    for name, method in results["methods"].items():
        estimated, actual = method.get("estimated_seconds"), method.get("actual_seconds")
        if estimated is None or (not estimated and (actual or 0) < 1):
            continue  # a rule baseline: no model, nothing to estimate
        ratio = method.get("estimate_ratio")
        rows.append([name, num(estimated, 0), num(actual, 0), num(ratio, 2)])
    rows.append(["whole run", num(timing["estimated_seconds"], 0), num(timing.get("run_seconds"), 0), "-"])
    return headers, rows


def comparison_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Per method: does it beat each reference significantly, with delta (method - reference) and p.
    A reference family without results gets no columns (the reading says so)."""
    refs = results["references"]
    keys = [key for key in REFERENCE_TITLES if refs.get(key)]
    headers = ["method"]
    for key in keys:
        headers += [f"beats {refs[key]}?", f"vs {refs[key]}: delta, p"]
    rows = []
    for name in results["ranking"]:
        comparisons = results["methods"][name]["comparisons"]
        row = [method_label(results, name)]
        for key in keys:
            row += [_beats(comparisons[key]), comparison_cell(comparisons[key])]
        rows.append(row)
    return headers, rows


def users_needed_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Per method: how many users a one-sided paired test (at ``ALPHA``, power ``POWER``) needs to detect
    a difference from the non-personal reference on the primary metric, from the spread of the per-user
    differences in this run: for the observed difference and for each of ``DETECTABLE_DIFFERENCES``.
    No rows without that reference."""
    primary, reference = results["primary_metric"], results["references"].get("non_personal")
    sizes = DETECTABLE_DIFFERENCES.get(primary, ())
    headers = ["method", "sd of per-user differences", "delta", "users for delta"]
    headers += [f"users for {size:g}" for size in sizes]
    if reference is None:
        return headers, []
    theirs = results["methods"][reference]["per_user"][primary]
    rows = []
    for name in scored_methods(results):
        if name == reference:
            continue
        own = results["methods"][name]["per_user"][primary]
        common = sorted(set(own) & set(theirs))
        if len(common) < 2:
            continue
        sd = metrics.paired_sd({u: own[u] for u in common}, {u: theirs[u] for u in common})
        delta = float(sum(own[u] - theirs[u] for u in common) / len(common))
        row = [method_label(results, name), num(sd), signed(delta)]
        for size in (delta, *sizes):
            row.append(_users_for(sd, size))
        rows.append(row)
    return headers, rows


def _users_for(sd: float, delta: float) -> str:
    """Users needed to detect ``delta`` through a spread ``sd``; "-" for a difference the table shows as
    0.000 (two methods equal on every user differ by float noise, which would ask for 10^30 users)."""
    if round(delta, 3) == 0:
        return "-"
    return str(metrics.users_needed(sd, delta, alpha=ALPHA, power=POWER))


def users_needed_caption(results: Results) -> str:
    """What the users-needed table shows, in one sentence."""
    return (
        f"Users a one-sided paired test (alpha {ALPHA}, power {POWER}) needs to detect a difference in "
        f"{results['primary_metric']} from {results['references'].get('non_personal')}, given the spread "
        "of the per-user differences in this run: n = ((z(1-alpha) + z(power)) x sd / delta)^2. "
        "delta = method - reference."
    )


def setting_rows(results: Results) -> list[list[str]]:
    """The task, the run's configuration and the statistics used, as [setting, value] rows."""
    task = results["task"]
    rows = [
        ["task", str(task["name"])],
        ["kind", str(task["kind"])],
        ["labels", ", ".join(task["labels"]) if task.get("labels") else "-"],
        [
            "metrics",
            f"{', '.join(results['metrics'])} (primary: {results['primary_metric']}, {sense(results)})",
        ],
        ["source", str(task.get("source", "-"))],
        ["test users", str(results["users_in_run"])],
        ["started", str(results.get("started") or "-")],
    ]
    for key, value in results["config"].items():
        rows.append([f"config.{key}", value if isinstance(value, str) else json.dumps(value)])
    stats = results["statistics"]
    rows.append(
        [
            "statistics",
            f"{stats['ci_level']:.0%} percentile bootstrap CI over users "
            f"({stats['ci_resamples']} resamples); {stats['test']} ({stats['paired_resamples']} resamples), "
            f"significant at p < {stats['alpha']}; seed {stats['seed']}",
        ]
    )
    return rows


def notes(results: Results, extra: Sequence[str] = ()) -> list[str]:
    """The run's warnings and the report's own ``extra`` notes for the Notes section; "none" rather than an
    empty list."""
    return [*results["warnings"], *extra] or ["none"]
