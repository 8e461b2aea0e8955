"""The rule-based baselines on a toy rating task small enough to compute every answer by hand, and the
generation baseline on the LaMP-7 fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailorlm import metrics
from tailorlm.data import load_task
from tailorlm.data.schema import Example, Task, User
from tailorlm.data.specs import TaskSpec
from tailorlm.methods import baselines

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"
LABELS = ("1", "2", "3", "4", "5")  # a label's position is its rating minus one


def _user(user_id: str, train: dict[str, str], test: list[str]) -> User:
    def example(item: str, target: str) -> Example:
        return Example(f"{user_id}/{item}", f"item {item}", target, (target,), item_key=item)

    return User(
        user_id,
        train=[example(item, rating) for item, rating in train.items()],
        test=[example(item, "3") for item in test],  # test targets are never read
    )


@pytest.fixture
def toy() -> Task:
    spec = TaskSpec("toy", "offline", "toy", "rating", LABELS, ("mae",), "hand-computed baselines")
    users = [
        _user("ann", {"A": "5", "B": "4", "E": "5"}, ["C"]),
        _user("bob", {"A": "2", "B": "1", "C": "1"}, ["E"]),
        _user("cid", {"B": "3", "C": "5"}, ["A", "D"]),
        _user("dee", {"F": "4", "G": "5", "H": "5"}, ["B"]),
    ]
    return Task("toy", "rating", LABELS, ("mae",), users, spec)


def _answers(baseline: baselines.Baseline, task: Task) -> dict[str, list[str]]:
    return {user.id: answers for user, answers, _ in baseline(task, task.users)}


# Every training answer per item, as positions (rating - 1):
#   A: ann 4, bob 1           mean 5/2 = 2.5
#   B: ann 3, bob 0, cid 2    mean 5/3 = 1.667
#   C: bob 0, cid 4           mean 4/2 = 2
#   E: ann 4; F: dee 3; G: dee 4; H: dee 4 (one answer each)
# Per user: ann 4+3+4 = 11, bob 1+0+0 = 1, cid 2+4 = 6, dee 3+4+4 = 11: 29 over 11 answers.
# Label counts over all training answers: "5" x5 (ann A, E; cid C; dee G, H), "1" x2, "4" x2, "2" x1,
# "3" x1; so the global order, most frequent first with ties in label order, is 5, 1, 4, 2, 3.


def test_user_majority_breaks_ties_by_global_frequency(toy):
    assert _answers(baselines.user_majority, toy) == {
        "ann": ["5"],  # 5, 4, 5: "5" twice
        "bob": ["1"],  # 2, 1, 1: "1" twice
        "cid": ["5", "5"],  # 3, 5: a tie, and "5" comes before "3" globally (label order would give "3")
        "dee": ["5"],  # 4, 5, 5
    }


def test_user_mean_rounds_the_mean_position(toy):
    assert _answers(baselines.user_mean, toy) == {
        "ann": ["5"],  # (4 + 3 + 4) / 3 = 3.667 -> position 4
        "bob": ["1"],  # (1 + 0 + 0) / 3 = 0.333 -> position 0
        "cid": ["4", "4"],  # (2 + 4) / 2 = 3 -> position 3
        "dee": ["5"],  # (3 + 4 + 4) / 3 = 3.667 -> position 4
    }


def test_item_user_bias_adds_the_user_offset_to_the_item_mean(toy):
    # Global mean of all 11 training positions: 29 / 11 = 2.636 (what the unseen item D counts with).
    # User bias = mean over the user's training items of (their position - the item's mean):
    #   ann: (4 - 2.5) + (3 - 5/3) + (4 - 4) = 1.5 + 1.333 + 0 = 2.833; / 3 = 0.944
    #   bob: (1 - 2.5) + (0 - 5/3) + (0 - 2) = -1.5 - 1.667 - 2 = -5.167; / 3 = -1.722
    #   cid: (2 - 5/3) + (4 - 2) = 0.333 + 2 = 2.333; / 2 = 1.167
    #   dee: every item only dee answered, so each deviation is 0: bias 0
    assert _answers(baselines.item_user_bias, toy) == {
        "ann": ["4"],  # C: 2 + 0.944 = 2.944 -> position 3
        "bob": ["3"],  # E: 4 - 1.722 = 2.278 -> position 2
        "cid": ["5", "5"],  # A: 2.5 + 1.167 = 3.667 -> 4; D (unseen): 2.636 + 1.167 = 3.803 -> 4
        "dee": ["3"],  # B: 5/3 + 0 = 1.667 -> position 2
    }


def test_item_majority_takes_the_items_most_given_label(toy):
    assert _answers(baselines.item_majority, toy) == {
        "ann": ["5"],  # C: "1", "5" tie -> "5" comes first globally
        "bob": ["5"],  # E: "5"
        "cid": ["5", "5"],  # A: "5", "2" tie -> "5"; D: nobody answered it -> the global first, "5"
        "dee": ["1"],  # B: "4", "1", "3" all once -> "1" is the most frequent of them globally
    }


def test_user_item_prior_multiplies_the_two_priors_over_the_global_one(toy):
    # Global prior, add-one over the 11 item answers ("1" 2, "2" 1, "3" 1, "4" 2, "5" 5): 3, 2, 2, 3, 6 / 16.
    # dee's prior (4 once, 5 twice; plus one pseudo-answer spread by the global prior), x 64:
    #   (0 + 3/16) / 4, ... -> 3, 2, 2, 19, 38
    # item B's prior (4, 1, 3 once each), x 64: 19, 2, 18, 19, 6
    # product / global, up to a constant: 3*19/3, 2*2/2, 2*18/2, 19*19/3, 38*6/6 = 19, 2, 18, 120.3, 38
    # cumulative 19, 21, 39, 159.3 of 197.3: the median (MAE is the first metric) is "4" -- where
    # user-majority says "5" and item-majority "1".
    answers = _answers(baselines.user_item_prior, toy)
    assert answers["dee"] == ["4"]
    assert set(answers) == {"ann", "bob", "cid", "dee"} and all(
        len(a) == len(u.test) for u, a in zip(toy.users, answers.values(), strict=True)
    )


def test_a_distribution_answers_what_suits_the_metric():
    def task(metric: str, ordinal: bool = True) -> Task:
        spec = TaskSpec("t", "offline", "t", "rating" if ordinal else "classification", LABELS, (metric,), "")
        return Task("t", "rating" if ordinal else "classification", LABELS, (metric,), [], spec)

    skewed = [0.4, 0.0, 0.0, 0.0, 0.6]  # the median is "5", the mean (position 2.4) is nearest "3"
    assert baselines.suited_label(task("mae"), skewed) == "5"
    assert baselines.suited_label(task("rmse"), skewed) == "3"
    assert baselines.suited_label(task("accuracy"), skewed) == "5"
    assert (
        baselines.suited_label(task("mae"), [0.5, 0.1, 0.0, 0.0, 0.4]) == "1"
    )  # half the mass reached at "1"
    assert baselines.suited_label(task("accuracy"), [0.3, 0.3, 0.0, 0.0, 0.4]) == "5"


def test_damped_biases_and_matrix_factorisation_follow_user_and_item_effects():
    # Two users who rate every item alike except that "hi" rates one step higher than "lo"; items differ.
    spec = TaskSpec("bias", "offline", "bias", "rating", LABELS, ("mae",), "")
    items = {"a": 1, "b": 2, "c": 3}
    hi = _user("hi", {i: str(r + 1) for i, r in items.items()}, ["a", "c"])
    lo = _user("lo", {i: str(r) for i, r in items.items()}, ["a", "c"])
    extra = [_user(f"u{k}", {i: str(r + k % 2) for i, r in items.items()}, []) for k in range(6)]
    task = Task("bias", "rating", LABELS, ("mae",), [hi, lo, *extra], spec)
    for baseline in (baselines.damped_biases, baselines.matrix_factorisation):
        answers = _answers(baseline, task)
        assert [int(x) for x in answers["hi"]] >= [int(x) for x in answers["lo"]]
        assert int(answers["hi"][1]) > int(answers["lo"][0])  # item c for hi above item a for lo
        assert answers == _answers(baseline, task)  # seeded: the same answers every time
    asked = [user.id for user, _, _ in baselines.damped_biases(task, [hi, lo])]
    assert asked == ["hi", "lo"]  # fitted on everyone's training answers, answering only those asked


LIKERT = ("very inaccurate", "moderately inaccurate", "neither", "moderately accurate", "very accurate")


def _relabelled(task: Task, names: dict[str, str]) -> Task:
    """``task`` with every label renamed (in the same order): a 1-5 scale written as words."""

    def example(e: Example) -> Example:
        return Example(e.id, e.text, names[e.target], (names[e.target],), item_key=e.item_key)

    labels = tuple(names[label] for label in task.labels)
    users = [User(u.id, [example(e) for e in u.train], test=[example(e) for e in u.test]) for u in task.users]
    spec = TaskSpec("likert", "table", "likert", "rating", labels, ("mae", "rmse"), "")
    return Task("likert", "rating", labels, ("mae", "rmse"), users, spec)


@pytest.mark.parametrize("primary", ["mae", "rmse"])
def test_a_scale_written_in_words_gets_the_answers_and_errors_of_its_numbers(toy, primary):
    names = dict(zip(LABELS, LIKERT, strict=True))
    toy.metrics = (primary,)
    words = _relabelled(toy, names)
    words.metrics = (primary,)
    applicable = baselines.applicable(words)
    assert set(applicable) == set(baselines.applicable(toy))
    for name, baseline in applicable.items():
        numbers = _answers(baseline, toy)
        assert _answers(baseline, words) == {
            u: [names[a] for a in answers] for u, answers in numbers.items()
        }, name
        golds = [e.target for u in toy.users for e in u.test]
        predicted = [a for u in toy.users for a in numbers[u.id]]
        owners = [u.id for u in toy.users for _ in u.test]
        scored = metrics.score(["mae", "rmse"], golds, predicted, owners, LABELS)
        in_words = metrics.score(
            ["mae", "rmse"], [names[g] for g in golds], [names[p] for p in predicted], owners, LIKERT
        )
        assert (
            in_words["pooled"] == pytest.approx(scored["pooled"])
            and in_words["per_user"] == scored["per_user"]
        )


def test_baselines_that_apply_to_each_kind_of_task(toy):
    assert set(baselines.applicable(toy)) == {
        "user-majority",
        "user-mean",
        "item-user-bias",
        "item-majority",
        "user-item-prior",
        "damped-biases",
        "matrix-factorisation",
    }
    tags = load_task("lamp:2", data_dir=FIXTURES / "lamp" / "lamp2", split="dev")
    assert set(baselines.applicable(tags)) == {"user-majority"}  # no order, no shared items
    tweets = load_task("lamp:7", data_dir=FIXTURES / "lamp" / "lamp7", split="train")
    assert set(baselines.applicable(tweets)) == {"nearest-output"}


def test_nearest_output_answers_with_the_closest_items_own_output():
    # LaMP profile items carry no "target" field; the output is that of the training example made from
    # the item (for LaMP-7, the tweet itself).
    task = load_task("lamp:7", data_dir=FIXTURES / "lamp" / "lamp7", split="train")
    answers = _answers(baselines.nearest_output, task)
    assert answers == {
        # "... waiting for the bus every morning" shares "bus" with 7011 and no word with 7010.
        "701": ["another monday, another missed bus"],
        "702": ["books > people"],  # the user's only item
    }


def test_nearest_output_on_lamp5_reads_the_title_of_any_visible_item():
    # ada's two questions see different profiles, so only 5011 (seen by both) is a training example; the
    # others still have an output: their title, as LaMP-5's profile template reads it.
    task = load_task("lamp:5", data_dir=FIXTURES / "lamp" / "lamp5", split="dev")
    answers = _answers(baselines.nearest_output, task)
    assert answers == {
        "ada": [
            "Deep nets for tabular data",  # 501 sees 5010 and 5011; "neural networks tabular data" -> 5010
            "Attention that skips",  # 502 sees 5011 and 5012; "sparse attention long sequences" -> 5012
        ],
        "bo": ["Folding at home"],
    }
    assert all(answer for answers in answers.values() for answer in answers)
