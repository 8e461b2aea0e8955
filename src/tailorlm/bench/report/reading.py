"""The report's "reading" paragraph: what the numbers show, in sentences.

It is built from the results only (the leader, each reference comparison, then the caveats), so it can say
no more than they do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tailorlm.bench.report.activity import Activity, by_activity, users_text
from tailorlm.bench.report.tables import (
    REFERENCE_TITLES,
    Results,
    delta_p,
    failed_methods,
    num,
    scored_methods,
    sense,
    signed,
    users_cell,
)
from tailorlm.bench.results import ALPHA, LEVEL, REFERENCES

_LISTED = 8  # names spelled out in a sentence before "and N more"
# The activity sentence speaks only of bins with at least this many users: a bin of one or two users (a run
# where nearly everyone has the same number of items has such bins) shows those users, not a level.
MIN_BIN_USERS = 5


def _series(names: Sequence[str], limit: int = _LISTED) -> str:
    shown = list(names[:limit])
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def reading(results: Results) -> str:
    """A short account of what the numbers show: the leader, the significant comparisons, the caveats."""
    scored = scored_methods(results)
    if not scored:
        failed = failed_methods(results)
        if failed:
            return f"No method has results: {_series(list(failed))} failed (the notes give the reasons)."
        return "No method has results yet (no user finished), so there is nothing to read."
    sentences = [_leader_sentence(results, scored)]
    sentences += [_reference_sentence(results, scored, key) for key in REFERENCE_TITLES]
    sentences.append(_activity_sentence(results))
    sentences += _caveats(results, scored)
    return " ".join(s for s in sentences if s)


def _leader_sentence(results: Results, scored: list[str]) -> str:
    primary, methods = results["primary_metric"], results["methods"]
    best = methods[scored[0]]["metrics"][primary]
    text = (
        f"{len(scored)} of {len(methods)} methods have results on {results['task']['name']} "
        f"({results['users_in_run']} test users in the run). On {primary} ({sense(results)}, per-user mean) "
        f"{scored[0]} ranks first with {num(best['user_mean'])} ({LEVEL:.0%} CI {num(best['ci_low'])} to "
        f"{num(best['ci_high'])}, {methods[scored[0]]['n_users']} users)."
    )
    if not methods[scored[0]]["complete"]:
        text += " It is partial, so that mean is over a subset of the users the others were scored on."
    if len(scored) > 1:
        second = methods[scored[1]]["metrics"][primary]
        overlap = second["ci_high"] >= best["ci_low"] and best["ci_high"] >= second["ci_low"]
        if np.isclose(second["user_mean"], best["user_mean"], rtol=0.0, atol=1e-12):
            verdict = "the same mean, so the two are tied and listed by name."
        elif overlap:
            verdict = "their intervals overlap, so these users do not settle the order of the two."
        else:
            verdict = "their intervals do not overlap."
        text += f" The runner-up, {scored[1]}, has {num(second['user_mean'])}; {verdict}"
    return text


def _reference_sentence(results: Results, scored: list[str], key: str) -> str:
    title, ref = REFERENCE_TITLES[key], results["references"][key]
    if ref is None:
        return f"No {REFERENCES[key]} method has results, so nothing was compared with {title}."
    methods = results["methods"]
    compared = [n for n in scored if methods[n]["comparisons"][key]["status"] == "compared"]
    if not compared:
        return f"{title.capitalize()} is {ref}; no other method shares users with it."
    winners = [n for n in compared if methods[n]["comparisons"][key]["significant"]]
    mean = methods[ref]["metrics"][results["primary_metric"]]["user_mean"]
    head = f"Against {title}, {ref} ({num(mean)}), "
    if not winners:
        return head + f"none of the {len(compared)} other methods is significantly better (p < {ALPHA})."
    detail = [f"{n} ({delta_p(methods[n]['comparisons'][key])})" for n in winners]
    return (
        head + f"{len(winners)} of {len(compared)} are significantly better (p < {ALPHA}): {_series(detail)}."
    )


def _activity_sentence(results: Results) -> str:
    """Where the best personal method is ahead of the non-personal reference, by the user's number of
    training items; nothing when there are fewer than two bins of ``MIN_BIN_USERS`` to set side by side."""
    activity = by_activity(results)
    if activity is None or activity.reference is None:
        return ""
    usable = {i for i, b in enumerate(activity.bins) if len(b.users) >= MIN_BIN_USERS}
    lower, methods = results["lower_is_better"], results["methods"]
    # Per personal method: (bin index, gain over the reference) for each usable bin where the two share users.
    gains = {
        name: [(i, g) for i, g in enumerate(activity.gains(name, lower)) if g is not None and i in usable]
        for name in activity.means
        if methods[name]["personal"]
    }
    gains = {name: pairs for name, pairs in gains.items() if len(pairs) >= 2}
    if not gains:
        return ""
    best = next(iter(gains))  # activity.means runs best first
    pairs = gains[best]
    (first, low), (last, high) = pairs[0], pairs[-1]
    bins = (
        f"{len(activity.bins)} bins"
        if len(usable) == len(activity.bins)
        else f"{len(usable)} of its {len(activity.bins)} bins, those of at least {MIN_BIN_USERS} users"
    )
    text = (
        f"By the user's number of training items ({bins}), the gain of {best}, the best "
        f"personal method, over {activity.reference} is {signed(low)} in the least active bin "
        f"({_bin_text(activity, first)}) and {signed(high)} in the most active "
        f"({_bin_text(activity, last)}); {_where_ahead(activity, pairs)}"
    )
    if len(gains) > 1:
        text += (
            f"; personal methods ahead of {activity.reference}: {_ahead_count(gains, first)} in the least "
            f"active bin, {_ahead_count(gains, last)} in the most active"
        )
    return text + " (means per bin, not tested)."


def _ahead_count(gains: dict[str, list[tuple[int, float]]], index: int) -> str:
    """How many of the methods with a gain in bin ``index`` are ahead there, as "k of n"."""
    there = [gain for pairs in gains.values() for i, gain in pairs if i == index]
    return f"{sum(_ahead(g) for g in there)} of {len(there)}"


def _ahead(gain: float) -> bool:
    """Better than the reference by more than float noise (a mean of per-user differences that cancel)."""
    return gain > 1e-12


def _bin_text(activity: Activity, index: int) -> str:
    found = activity.bins[index]
    return f"{found.items}, {users_text(len(found.users))}"


def _where_ahead(activity: Activity, pairs: Sequence[tuple[int, float]]) -> str:
    """In which bins a method with these (bin index, gain) pairs is ahead: all, none, from some bin on, or
    a count when it is not ahead in the most active bin."""
    ahead = [_ahead(gain) for _, gain in pairs]
    if all(ahead):
        return "it is ahead in every bin"
    if not any(ahead):
        return "it is ahead in no bin"
    if ahead[-1]:
        start = max(i for i, flag in enumerate(ahead) if not flag) + 1
        return (
            f"it is ahead in every bin from {activity.bins[pairs[start][0]].items} on, "
            f"not in the {activity.bins[pairs[start - 1][0]].label} one"
        )
    return f"it is ahead in {sum(ahead)} of {len(ahead)} bins, not in the most active one"


def _caveats(results: Results, scored: list[str]) -> list[str]:
    methods = results["methods"]
    notes = []
    failed = failed_methods(results)
    if failed:
        notes.append(
            f"Failed: {_series(list(failed))}; a failed method is scored on the users it finished, if any, "
            "and the notes give each one's reason."
        )
    partial = [
        f"{n} ({users_cell(methods[n]).removesuffix(' (partial)')})"
        for n in methods
        if not methods[n]["complete"] and n not in failed
    ]
    if partial:
        notes.append(
            f"Partial methods: {_series(partial)}; their figures cover only the users they finished, and "
            "every comparison uses only the users both methods have."
        )
    tests = sum(
        methods[n]["comparisons"][k]["status"] == "compared" for n in scored for k in REFERENCE_TITLES
    )
    if tests > 5:
        notes.append(f"No correction for multiple comparisons was applied across the {tests} tests.")
    users = max(methods[n]["n_users"] for n in scored)
    if users < 20:
        notes.append(
            f"With at most {users} users per method the intervals are wide; treat the order as tentative."
        )
    return notes
