"""The report by activity: users binned by their number of training items, each method's mean per bin."""

from __future__ import annotations

import html
import itertools
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import CLASSIFICATION, METHODS, RATING, answers, line, no_reference_run, write_run

from tailorlm.bench.report.activity import (
    MAX_BINS,
    MISSING_NOTE,
    activity_bins,
    activity_caption,
    activity_rows,
    bin_rule,
    by_activity,
    training_counts,
)
from tailorlm.bench.report.html_page import render_html
from tailorlm.bench.report.markdown import render_markdown
from tailorlm.bench.report.plots import PLOTS, plot_activity
from tailorlm.bench.report.reading import _where_ahead, reading
from tailorlm.bench.results import summarize

# 20 users, 15 distinct counts: the quartiles (method "higher") of these are 5, 10 and 25, so the bins are
# 2-3, 5-8, 10-20 and 25-60 items with 5 users each.
TRAIN = [2, 2, 3, 3, 3, 5, 5, 6, 7, 8, 10, 12, 15, 18, 20, 25, 30, 40, 50, 60]
BIN_LABELS = ["2-3", "5-8", "10-20", "25-60"]
PEFT_CORRECT = [3, 5, 7, 8]  # of 10, per bin: behind zero-shot's 5, level, then ahead
OPPU_MISSING = {"u03", "u19"}  # oppu has 4 of the first bin's users and 4 of the last's
FEW_SHOT_USERS = 10  # few-shot stopped after the users of the first two bins


def active_run(root: Path) -> Path:
    """zero-shot right on 5 of 10 for everyone; peft-lora's accuracy rises with the user's training items;
    oppu right on 4-7 of 10 (by user index mod 4), without two users; few-shot like zero-shot, on the first
    10 users only."""
    users = {f"u{i:02d}": {"history": n, "train": n, "val": 1, "test": 10} for i, n in enumerate(TRAIN)}
    methods = {name: METHODS[name] for name in ("zero-shot", "peft-lora", "oppu", "few-shot")}
    lines: dict[str, list[dict | str]] = {name: [] for name in methods}
    rng = np.random.default_rng(3)
    for index, user in enumerate(users):
        golds = [str(x) for x in rng.choice(["no", "perhaps", "yes"], 10)]
        lines["zero-shot"].append(line(user, golds, answers(golds, 5)))
        lines["peft-lora"].append(line(user, golds, answers(golds, PEFT_CORRECT[index // 5])))
        if index < FEW_SHOT_USERS:
            lines["few-shot"].append(line(user, golds, answers(golds, 5)))
        if user not in OPPU_MISSING:
            lines["oppu"].append(line(user, golds, answers(golds, 4 + index % 4)))
    return write_run(root, CLASSIFICATION, methods, users, lines)


@pytest.fixture(scope="module")
def active(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return summarize(active_run(tmp_path_factory.mktemp("active") / "run"))


def _ranges(counts: dict[str, int], max_bins: int = MAX_BINS) -> list[tuple[int, int, int]]:
    return [(b.low, b.high, len(b.users)) for b in activity_bins(counts, max_bins)]


# --- bins --------------------------------------------------------------------------------------------------


def test_bins_are_quartiles_of_the_counts():
    assert _ranges({f"u{i}": n for i, n in enumerate(TRAIN)}) == [
        (2, 3, 5),
        (5, 8, 5),
        (10, 20, 5),
        (25, 60, 5),
    ]
    assert _ranges({f"u{i}": i for i in range(1, 101)}) == [
        (1, 25, 25),
        (26, 50, 25),
        (51, 75, 25),
        (76, 100, 25),
    ]


def test_tied_counts_share_a_bin_even_when_bins_differ_in_size():
    # Ten users at 5: the first two quartiles are both 5, so the cut at 7 alone splits the users.
    counts = {f"u{i}": n for i, n in enumerate([5] * 10 + [6, 7, 8, 9, 10])}
    assert _ranges(counts) == [(5, 6, 11), (7, 10, 4)]


def test_few_distinct_counts_get_a_bin_each():
    counts = {"a": 9, "b": 5, "c": 1, "d": 5}
    assert _ranges(counts) == [(1, 1, 1), (5, 5, 2), (9, 9, 1)]
    assert activity_bins(counts)[1].users == ("b", "d") and activity_bins(counts)[1].label == "5"
    assert (
        bin_rule(activity_bins(counts), {})
        == "one bin per number of training items (the run has 3 distinct numbers)"
    )


def test_one_count_or_one_user_is_one_bin_and_the_rule_says_why():
    same = {f"u{i}": 16 for i in range(12)}
    assert _ranges(same) == [(16, 16, 12)] and _ranges({"only": 7}) == [(7, 7, 1)]
    assert bin_rule(activity_bins({"only": 1}), {}) == "every user has 1 training item, so there is one bin"
    assert (
        bin_rule(activity_bins(same), {"config": {}})
        == "every user has 16 training items, so there is one bin"
    )
    capped = bin_rule(activity_bins(same), {"config": {"user_examples": 16}})
    assert "the run's cap, config.user_examples" in capped
    assert activity_bins({}) == []


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_bins", [1, 3, 4, 5])
def test_every_user_is_in_exactly_one_nonempty_bin_in_order(seed, max_bins):
    rng = np.random.default_rng(seed)
    counts = {f"u{i}": int(n) for i, n in enumerate(rng.geometric(0.05, size=int(rng.integers(1, 60))))}
    bins = activity_bins(counts, max_bins)
    assert 1 <= len(bins) <= max_bins
    assert sorted(u for b in bins for u in b.users) == sorted(counts)
    for b in bins:
        assert b.users and all(b.low <= counts[u] <= b.high for u in b.users)
        assert min(counts[u] for u in b.users) == b.low and max(counts[u] for u in b.users) == b.high
    assert all(a.high < b.low for a, b in itertools.pairwise(bins))


def test_max_bins_below_one_is_refused():
    with pytest.raises(ValueError, match="max_bins must be at least 1"):
        activity_bins({"u": 1}, 0)


def test_counts_are_read_from_the_results_and_unusable_ones_are_skipped(active):
    assert training_counts(active) == {f"u{i:02d}": n for i, n in enumerate(TRAIN)}
    odd = {
        "users": {"a": {"train": 3}, "b": {"train": True}, "c": {"train": -1}, "d": {"history": 2}, "e": 4}
    }
    assert training_counts(odd) == {"a": 3}
    assert training_counts({}) == {}


# --- figures and table -------------------------------------------------------------------------------------


def test_means_are_per_bin_means_and_deltas_are_against_the_reference(active):
    found = by_activity(active)
    assert found is not None and found.reference == "zero-shot"
    assert [b.label for b in found.bins] == BIN_LABELS
    assert found.means["zero-shot"] == pytest.approx([0.5] * 4)
    assert found.means["peft-lora"] == pytest.approx([0.3, 0.5, 0.7, 0.8])
    assert found.deltas["peft-lora"] == pytest.approx([-0.2, 0.0, 0.2, 0.3])
    assert found.deltas["zero-shot"] == [None] * 4
    # oppu: 4 + index % 4 right of 10; without u03 and u19. Bin 1: users 0, 1, 2, 4 -> 4, 5, 6, 4 right;
    # bin 2: 5-9 -> 5, 6, 7, 4, 5; bin 3: 10-14 -> 6, 7, 4, 5, 6; bin 4: 15-18 -> 7, 4, 5, 6.
    assert found.n_users["oppu"] == [4, 5, 5, 4]
    assert found.means["oppu"] == pytest.approx([0.475, 0.54, 0.56, 0.55])
    assert found.gains("oppu", lower_is_better=True) == pytest.approx([0.025, -0.04, -0.06, -0.05])
    # few-shot has none of the last two bins' users: no mean there, and no difference.
    assert found.means["few-shot"] == [pytest.approx(0.5), pytest.approx(0.5), None, None]
    assert found.n_users["few-shot"] == [5, 5, 0, 0] and found.deltas["few-shot"][2:] == [None, None]
    assert found.uncounted == 0


def test_table_rows_show_mean_delta_and_a_partial_bin(active):
    found = by_activity(active)
    headers, rows = activity_rows(found, active)
    assert headers == ["method", "family", *(f"{label} items (5 users)" for label in BIN_LABELS)]
    by_name = {row[0]: row for row in rows}
    assert [row[0] for row in rows] == ["peft-lora", "oppu (partial)", "few-shot (partial)", "zero-shot"]
    assert by_name["peft-lora"][2:] == [
        "0.300 (-0.200)",
        "0.500 (+0.000)",
        "0.700 (+0.200)",
        "0.800 (+0.300)",
    ]
    assert by_name["oppu (partial)"][2] == "0.475 (-0.025), 4 users"
    assert by_name["zero-shot"][2:] == ["0.500"] * 4
    assert by_name["few-shot (partial)"][2:] == ["0.500 (+0.000)", "0.500 (+0.000)", "-", "-"]


def test_reading_says_where_the_best_personal_method_is_ahead(active):
    text = reading(active)
    assert (
        "the gain of peft-lora, the best personal method, over zero-shot is -0.200 in the least active bin"
        in text
    )
    assert "it is ahead in every bin from 10-20 items on, not in the 5-8 one" in text
    assert "personal methods ahead of zero-shot: 0 of 3 in the least active bin, 2 of 2 in the most" in text


def test_reading_speaks_only_of_bins_with_enough_users(active):
    # u00 alone at 1 item, u01-u09 at 2, u10-u19 at 3: three bins, the first of one user.
    users = {
        u: {**entry, "train": 1 if u == "u00" else 2 if u < "u10" else 3}
        for u, entry in active["users"].items()
    }
    text = reading({**active, "users": users})
    assert "(2 of its 3 bins, those of at least 5 users)" in text
    # peft-lora right on 3 of 10 for u01-u04 and 5 for u05-u09: mean 0.411, so -0.089 against 0.5.
    assert "is -0.089 in the least active bin (2 items, 9 users) and +0.250 in the most active" in text
    headers, _ = activity_rows(by_activity({**active, "users": users}), active)
    assert headers[2:] == ["1 item (1 user)", "2 items (9 users)", "3 items (10 users)"]


@pytest.mark.parametrize(
    ("gains", "says"),
    [
        ([0.1, 0.2, 0.1, 0.3], "it is ahead in every bin"),
        ([-0.1, 0.0, -1e-17, -0.3], "it is ahead in no bin"),
        ([0.1, -0.1, 0.2, 0.1], "it is ahead in every bin from 10-20 items on, not in the 5-8 one"),
        ([0.1, 0.2, 0.1, -0.1], "it is ahead in 3 of 4 bins, not in the most active one"),
    ],
)
def test_where_ahead_says_only_what_the_bins_show(active, gains, says):
    assert _where_ahead(by_activity(active), list(enumerate(gains))) == says


def test_a_lower_is_better_metric_reads_its_gains_the_right_way(tmp_path):
    # MAE: zero-shot one off for everyone; peft-lora two off for the users with 3 items, exact with 30.
    users = {f"r{i}": {"history": 1, "train": 3 if i < 5 else 30, "val": 0, "test": 2} for i in range(10)}
    methods = {name: METHODS[name] for name in ("zero-shot", "peft-lora")}
    lines: dict[str, list[dict | str]] = {
        "zero-shot": [line(u, ["3", "3"], ["4", "4"]) for u in users],
        "peft-lora": [
            line(u, ["3", "3"], ["5", "5"] if n["train"] == 3 else ["3", "3"]) for u, n in users.items()
        ],
    }
    results = summarize(write_run(tmp_path, RATING, methods, users, lines))
    _, rows = activity_rows(by_activity(results), results)
    assert rows[0] == ["peft-lora", "parameter-personal", "2.000 (+1.000)", "0.000 (-1.000)"]
    assert "negative is better" in render_markdown(results, {})
    assert "over zero-shot is -1.000 in the least active bin (3 items, 5 users) and +1.000" in reading(
        results
    )
    assert "ahead in every bin from 30 items on, not in the 3 one" in reading(results)


def test_one_bin_gives_a_table_but_no_sentence(planted):
    _, results = planted  # every planted user has 8 training items
    found = by_activity(results)
    assert [b.label for b in found.bins] == ["8"] and "number of training items (" not in reading(results)
    assert "## By activity" in render_markdown(results, {})


def test_the_section_and_the_plot_are_in_both_reports(active):
    markdown = render_markdown(active, {"activity": "plots/activity.png"})
    assert "## By activity" in markdown and "| peft-lora | parameter-personal | 0.300 (-0.200) |" in markdown
    assert "bins cut at the quartiles" in markdown and MISSING_NOTE not in markdown
    page = render_html(active, {"activity": plot_activity(active)})
    assert (
        "<h2>By activity</h2>" in page
        and "0.800 (+0.300)" in page
        and html.escape(PLOTS["activity"][0]) in page
    )


def test_a_scored_user_without_a_count_is_left_out_and_said_so(active):
    users = {**active["users"], "u00": {"history": 2}}  # u00's count lost
    found = by_activity({**active, "users": users})
    assert found.uncounted == 1 and found.bins[0].users == ("u01", "u02", "u03", "u04")
    assert "1 scored user(s) without a recorded number are left out" in activity_caption(found, active)


def test_old_results_leave_the_section_out_with_a_note(active, tmp_path):
    old = {key: value for key, value in active.items() if key != "users"}
    no_train = summarize(no_reference_run(tmp_path))  # its run.json has history but no train counts
    for results in (old, no_train):
        assert by_activity(results) is None
        markdown = render_markdown(results, {})
        assert "## By activity" not in markdown and f"- {MISSING_NOTE}" in markdown
        page = render_html(results, {})
        assert "By activity" not in page and html.escape(MISSING_NOTE) in page
        assert plot_activity(results).startswith(b"\x89PNG")


def test_plot_is_a_png_and_the_same_each_time(active):
    png = plot_activity(active)
    assert png.startswith(b"\x89PNG") and plot_activity(active) == png
