"""The report's "reading" paragraph: what the numbers show, in sentences.

It is built from the results only (the leader, each reference comparison, then the caveats), so it can say
no more than they do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tailorlm.bench.report.tables import (
    REFERENCE_TITLES,
    Results,
    delta_p,
    failed_methods,
    num,
    scored_methods,
    sense,
    users_cell,
)
from tailorlm.bench.results import ALPHA, LEVEL, REFERENCES

_LISTED = 8  # names spelled out in a sentence before "and N more"


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
