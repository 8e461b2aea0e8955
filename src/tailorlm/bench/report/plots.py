"""The report's figures, each drawn from the results to PNG bytes.

Figures are made with ``matplotlib.figure.Figure`` on the Agg canvas rather than through ``pyplot``: no
GUI backend and no global figure registry, so a report writes on a headless machine and leaves no figure
open behind it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tailorlm.bench.report.activity import by_activity, users_text
from tailorlm.bench.report.tables import Results, method_label, scored_methods, sense
from tailorlm.bench.results import LEVEL

FAMILY_COLOURS: dict[str, str] = {
    "simple-baseline": "#7f7f7f",
    "non-personal": "#1f77b4",
    "prompt-personal": "#2ca02c",
    "parameter-personal": "#d62728",
    "shared-personal": "#ff7f0e",
    "oppu": "#9467bd",
}
OTHER_COLOUR = "#bcbd22"
# Methods of one family share a colour; these tell them apart in a line plot, taken in turn.
LINE_STYLES: tuple[tuple[str, str], ...] = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def _colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, OTHER_COLOUR)


# --- figure helpers ----------------------------------------------------------------------------------------


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _new_figure(rows: int) -> tuple[Figure, Any]:
    figure = Figure(figsize=(8.0, max(2.8, 0.38 * rows + 1.4)))
    return figure, figure.add_subplot()


def _nothing(axes: Any, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="#555555")
    axes.set_xticks([])
    axes.set_yticks([])


def _legend(axes: Any, **options: Any) -> None:
    # Outside the axes: inside, it would hide the very points the reader is looking for.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, **options)


def _family_legend(axes: Any, families: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=_colour(f), label=f) for f in dict.fromkeys(families)]
    if handles:
        _legend(axes, handles=handles)


def _method_rows_figure(results: Results) -> tuple[Figure, Any, list[str]]:
    """A figure with one row per method that has results; the names come bottom-up so the best is on top."""
    ordered = list(reversed(scored_methods(results)))
    figure, axes = _new_figure(len(ordered))
    if not ordered:
        _nothing(axes, "no method has results yet")
    return figure, axes, ordered


# --- the figures -------------------------------------------------------------------------------------------


def plot_methods(results: Results) -> bytes:
    """(a) Each method's per-user mean on the primary metric with its CI, coloured by family, best on top."""
    figure, axes, ordered = _method_rows_figure(results)
    if not ordered:
        return _png(figure)
    methods, primary = results["methods"], results["primary_metric"]
    for y, name in enumerate(ordered):
        m = methods[name]["metrics"][primary]
        error = [[m["user_mean"] - m["ci_low"]], [m["ci_high"] - m["user_mean"]]]
        axes.errorbar(
            m["user_mean"], y, xerr=error, fmt="o", color=_colour(methods[name]["family"]), capsize=3
        )
    ref = results["references"]["non_personal"]
    if ref is not None:
        axes.axvline(methods[ref]["metrics"][primary]["user_mean"], color="#1f77b4", ls=":", lw=1)
    axes.set_yticks(range(len(ordered)), [method_label(results, n) for n in ordered])
    axes.set_xlabel(f"{primary}, per-user mean ({sense(results)}); bars: {LEVEL:.0%} CI over users")
    axes.set_title(f"{results['task']['name']}: methods on {primary}")
    _family_legend(axes, [methods[n]["family"] for n in reversed(ordered)])
    return _png(figure)


def plot_users(results: Results) -> bytes:
    """(b) How each method's per-user values spread: a box per method with the users as jittered dots."""
    figure, axes, ordered = _method_rows_figure(results)
    if not ordered:
        return _png(figure)
    methods, primary = results["methods"], results["primary_metric"]
    values = [np.array(list(methods[n]["per_user"][primary].values())) for n in ordered]
    boxes = axes.boxplot(
        values,
        orientation="horizontal",
        tick_labels=[method_label(results, n) for n in ordered],
        patch_artist=True,
        showfliers=False,
        widths=0.6,
    )
    for patch, name in zip(boxes["boxes"], ordered, strict=True):
        patch.set(facecolor=_colour(methods[name]["family"]), alpha=0.35)
    rng = np.random.default_rng(0)  # fixed jitter: the same run draws the same picture
    for position, points in enumerate(values, start=1):
        axes.scatter(
            points, position + rng.uniform(-0.18, 0.18, points.size), s=8, color="#333333", alpha=0.5
        )
    axes.set_xlabel(f"{primary} per user ({sense(results)})")
    axes.set_title(f"{results['task']['name']}: spread over users")
    return _png(figure)


def plot_gain(results: Results) -> bytes:
    """(c) Each personal method's per-user gain over the best non-personal method against history size."""
    figure, axes = _new_figure(8)
    ref, methods = results["references"]["non_personal"], results["methods"]
    by_family: dict[str, list[tuple[float, float]]] = {}
    for name in scored_methods(results):
        if methods[name]["personal"]:
            points = [
                (g["history"], g["gain"])
                for g in methods[name]["gain_vs_non_personal"]
                if g["history"] is not None
            ]
            by_family.setdefault(methods[name]["family"], []).extend(points)
    if ref is None or not any(by_family.values()):
        _nothing(
            axes, "no non-personal reference" if ref is None else "no personal method shares users with it"
        )
        return _png(figure)
    for family, points in by_family.items():
        if points:
            x, y = np.array(points, dtype=float).T
            axes.scatter(x, y, s=14, alpha=0.6, color=_colour(family), label=family)
    axes.axhline(0.0, color="#555555", lw=1)
    axes.set_xlabel("history size of the user (items)")
    axes.set_ylabel(f"gain in {results['primary_metric']} over {ref} (positive = better)")
    axes.set_title(f"{results['task']['name']}: personal methods vs {ref}, per user")
    _legend(axes)
    return _png(figure)


def plot_activity(results: Results) -> bytes:
    """(d) Each method's mean on the primary metric per bin of the users' number of training items, one line
    per method coloured by family, the non-personal reference drawn thicker."""
    figure, axes = _new_figure(8)
    activity = by_activity(results)
    if activity is None or not activity.means:
        _nothing(
            axes,
            "these results hold no user's number of training items"
            if activity is None
            else "no method has results yet",
        )
        return _png(figure)
    positions = np.arange(len(activity.bins))
    drawn: dict[str, int] = {}  # family -> how many of its methods are drawn already
    for name, means in activity.means.items():
        family = results["methods"][name]["family"]
        line, marker = LINE_STYLES[drawn.get(family, 0) % len(LINE_STYLES)]
        drawn[family] = drawn.get(family, 0) + 1
        axes.plot(
            positions,
            [np.nan if m is None else m for m in means],  # a gap where the method has none of the bin's users
            ls=line,
            marker=marker,
            color=_colour(family),
            lw=2.4 if name == activity.reference else 1.3,
            label=method_label(results, name),
        )
    axes.set_xticks(positions, [f"{b.label}\n({users_text(len(b.users))})" for b in activity.bins])
    axes.set_xlabel("training items of the user (bins)")
    axes.set_ylabel(f"{results['primary_metric']}, mean over the bin's users ({sense(results)})")
    axes.set_title(f"{results['task']['name']}: methods by the user's number of training items")
    _legend(axes)
    return _png(figure)


# Plot key (also the PNG's file name) -> (caption, drawing function), in the order the report shows them.
PLOTS: dict[str, tuple[str, Callable[[Results], bytes]]] = {
    "methods": ("Methods on the primary metric with their confidence intervals", plot_methods),
    "users": ("Spread of the per-user values", plot_users),
    "gain": ("Gain over the best non-personal method against history size", plot_gain),
    "activity": ("Methods by the user's number of training items (binned)", plot_activity),
}
