"""The report's view by activity: each method's score against how many training items the user had.

OPPU reports its gains by the user's activity level; this section does the same for a run, so that a reader
sees where personal methods start to pay off. The count is the one the runner recorded in run.json for each
test user (after any cap on training items), carried into results.json as ``users[<id>]["train"]``. Users
go into at most ``MAX_BINS`` bins: one bin per count when the run has that few distinct counts, else bins cut
at the quartiles of the counts, with tied counts always in one bin. Every figure is a mean over a bin's users
of the per-user values ``summarize`` computed on the primary metric; nothing here is tested per bin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tailorlm.bench.report.tables import Results, method_label, num, scored_methods, sense, signed

# Quartiles. On the runs this benchmark makes (12 to 96 test users) more bins would leave a handful of users
# in each, and a bin's mean over three users says little.
MAX_BINS = 4

MISSING_NOTE = (
    "No table by activity: these results hold no user's number of training items (a results.json from "
    "before it was recorded, or a run.json without it); `tailorlm report RUN` recomputes results.json from "
    "run.json."
)


@dataclass(frozen=True)
class ActivityBin:
    """The users whose number of training items lies in ``low``..``high`` (both included)."""

    low: int
    high: int
    users: tuple[str, ...]  # sorted, so that a mean over them adds in the same order on every run

    @property
    def label(self) -> str:
        """The range as a table header shows it: "8" or "8-12"."""
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"

    @property
    def items(self) -> str:
        """The range in words: "1 item", "8 items" or "8-12 items"."""
        return "1 item" if self.high == 1 and self.low == 1 else f"{self.label} items"


@dataclass(frozen=True)
class Activity:
    """The figures of the section; every list has one entry per bin, in the bins' order."""

    bins: list[ActivityBin]
    rule: str  # how the bins were made, in words
    reference: str | None  # the best non-personal method; the deltas are against it
    means: dict[str, list[float | None]]  # method (best first) -> mean over its users in the bin
    n_users: dict[str, list[int]]  # method -> how many of the bin's users it has results for
    deltas: dict[str, list[float | None]]  # method -> mean of (method - reference) over users both have
    uncounted: int  # scored users without a recorded count, left out of every bin

    def gains(self, name: str, lower_is_better: bool) -> list[float | None]:
        """A method's deltas turned so that positive means better than the reference."""
        sign = -1.0 if lower_is_better else 1.0
        return [None if d is None else sign * d for d in self.deltas[name]]


def users_text(count: int) -> str:
    """A number of users in words: "1 user", "4 users"."""
    return f"{count} user" if count == 1 else f"{count} users"


def training_counts(results: Results) -> dict[str, int]:
    """Each test user's number of training items; empty when the results hold none (an older results.json,
    or a run.json written without them)."""
    users = results.get("users")
    if not isinstance(users, Mapping):
        return {}
    counts = {str(user): _count(entry) for user, entry in users.items()}
    return {user: count for user, count in counts.items() if count is not None}


def _count(entry: object) -> int | None:
    """A user entry's number of training items, or None when it has no usable one."""
    count = entry.get("train") if isinstance(entry, Mapping) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def activity_bins(counts: Mapping[str, int], max_bins: int = MAX_BINS) -> list[ActivityBin]:
    """Users binned by their count, fewest items first: one bin per distinct count when there are at most
    ``max_bins``, else bins cut at the ``max_bins``-quantiles of the counts. Users with the same count are
    always in the same bin, so quantile bins can differ in size; no bin is empty."""
    if max_bins < 1:
        raise ValueError(f"max_bins must be at least 1, got {max_bins}")
    values = sorted(set(counts.values()))
    if not values:
        return []
    if len(values) <= max_bins:
        cuts = values[1:]
    else:
        # "higher": each cut is a count some user has, so the bin starting at it is never empty.
        quantiles = np.quantile(list(counts.values()), np.arange(1, max_bins) / max_bins, method="higher")
        cuts = sorted({int(q) for q in quantiles} - {values[0]})
    lows = [values[0], *cuts]  # bin i holds the counts in [lows[i], lows[i + 1])
    bins = []
    for index, low in enumerate(lows):
        upper = lows[index + 1] if index + 1 < len(lows) else values[-1] + 1
        members = tuple(sorted(u for u, c in counts.items() if low <= c < upper))
        bins.append(ActivityBin(low, max(counts[u] for u in members), members))
    return bins


def bin_rule(bins: Sequence[ActivityBin], results: Results, max_bins: int = MAX_BINS) -> str:
    """How ``activity_bins(counts, max_bins)`` made these bins, for the sentence above the table."""
    if len(bins) == 1:
        cap = results.get("config", {}).get("user_examples")
        why = " (the run's cap, config.user_examples)" if cap == bins[0].low else ""
        items = "1 training item" if bins[0].low == 1 else f"{bins[0].low} training items"
        return f"every user has {items}{why}, so there is one bin"
    if all(b.low == b.high for b in bins):
        return f"one bin per number of training items (the run has {len(bins)} distinct numbers)"
    quantiles = "quartiles" if max_bins == 4 else f"{max_bins}-quantiles"
    return (
        f"bins cut at the {quantiles} of the users' numbers of training items; users with the same number "
        "share a bin, so bins can differ in size"
    )


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def by_activity(results: Results) -> Activity | None:
    """The section's figures, or None when the results hold no user's number of training items."""
    counts = training_counts(results)
    if not counts:
        return None
    bins = activity_bins(counts)
    primary, methods = results["primary_metric"], results["methods"]
    reference = results["references"]["non_personal"]
    ref_values = methods[reference]["per_user"][primary] if reference is not None else {}
    means, n_users, deltas = {}, {}, {}
    scored_users: set[str] = set()
    for name in scored_methods(results):
        values = methods[name]["per_user"][primary]  # user -> the user's value of the primary metric
        scored_users |= set(values)
        own = [[values[u] for u in b.users if u in values] for b in bins]
        means[name] = [_mean(v) for v in own]
        n_users[name] = [len(v) for v in own]
        shared = [[u for u in b.users if u in values and u in ref_values] for b in bins]
        paired = [[values[u] - ref_values[u] for u in users] for users in shared]
        deltas[name] = [None if name == reference else _mean(d) for d in paired]
    return Activity(
        bins=bins,
        rule=bin_rule(bins, results),
        reference=reference,
        means=means,
        n_users=n_users,
        deltas=deltas,
        uncounted=len(scored_users - set(counts)),
    )


def activity_caption(activity: Activity, results: Results) -> str:
    """The sentence above the table: what a cell holds and how the bins were made."""
    text = (
        f"Each method's mean {results['primary_metric']} ({sense(results)}) over the users in each bin of "
        f"the user's number of training items. Bins: {activity.rule}."
    )
    if activity.reference is not None:
        text += (
            f" In brackets, the difference from {activity.reference} (method - reference, mean over the "
            f"bin's users both have{'; negative is better' if results['lower_is_better'] else ''}); not "
            "tested per bin."
        )
    text += " A cell naming a number of users covers only those."
    if activity.uncounted:
        text += f" {activity.uncounted} scored user(s) without a recorded number are left out."
    return text


def _cell(mean: float | None, delta: float | None, users: int, bin_users: int) -> str:
    if mean is None:
        return "-"
    text = num(mean) + ("" if delta is None else f" ({signed(delta)})")
    return text if users == bin_users else f"{text}, {users_text(users)}"


def activity_rows(activity: Activity, results: Results) -> tuple[list[str], list[list[str]]]:
    """Per method (best first): its family and one cell per bin, "mean (delta)", plus the number of users
    when it has results for fewer than the bin holds."""
    headers = ["method", "family"] + [f"{b.items} ({users_text(len(b.users))})" for b in activity.bins]
    rows = []
    for name, means in activity.means.items():
        cells = [
            _cell(mean, delta, users, len(b.users))
            for mean, delta, users, b in zip(
                means, activity.deltas[name], activity.n_users[name], activity.bins, strict=True
            )
        ]
        rows.append([method_label(results, name), results["methods"][name]["family"], *cells])
    return headers, rows


def activity_notes(activity: Activity | None) -> list[str]:
    """What the Notes section says about this section: why it is left out, if it is."""
    return [MISSING_NOTE] if activity is None else []
