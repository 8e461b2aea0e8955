"""Every metric rule against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tailorlm import metrics

HATEXPLAIN = ("hatespeech", "normal", "offensive")
GABHATE = ("Hateful", "Non-hateful")
GOEMOTION = ("anger", "disgust", "fear", "joy", "sadness", "surprise")


# --- LaMP exact-label rule ------------------------------------------------------------------------------


def test_exact_label_rule_strips_and_maps_non_labels_to_minus_one():
    labels = ["[1]", "[2]"]
    assert metrics.label_index(" [1] \n", labels) == 0
    assert metrics.label_index("1", labels) == -1
    assert metrics.label_index("[1].", labels) == -1
    golds = ["[1]", "[2]", "[1]", "[2]"]
    preds = [" [1] ", "[1]", "1", "[2]\n"]
    # mapped preds 0, 0, -1, 1 against golds 0, 1, 0, 1: the first and last are right.
    assert metrics.accuracy(golds, preds, labels) == 0.5
    # label [1]: tp 1, fp 1, fn 1 -> P 1/2, R 1/2, F 1/2; label [2]: tp 1, fp 0, fn 1 -> P 1, R 1/2, F 2/3.
    assert metrics.macro_f1(golds, preds, labels) == pytest.approx((0.5 + 2 / 3) / 2)


def test_macro_f1_is_over_real_labels_only_and_absent_labels_score_zero():
    labels = ["a", "b", "c"]
    # label a: tp 1, fn 1 (the "x" output is -1, no class of its own) -> F 2/3; b and c never occur -> 0.
    assert metrics.macro_f1(["a", "a"], ["a", "x"], labels) == pytest.approx(2 / 9)
    assert metrics.accuracy(["a", "a"], ["a", "x"], labels) == 0.5


def test_macro_f1_matches_scikit_learn_with_labels_restricted():
    rng = np.random.default_rng(3)
    labels = ["sci-fi", "comedy", "action", "romance"]
    golds = [labels[i] for i in rng.integers(0, 4, 200)]
    preds = [[*labels, "nonsense"][i] for i in rng.integers(0, 5, 200)]
    gi = [metrics.label_index(g, labels) for g in golds]
    pi = [metrics.label_index(p, labels) for p in preds]
    expected = f1_score(gi, pi, labels=list(range(4)), average="macro", zero_division=0)
    assert metrics.macro_f1(golds, preds, labels) == pytest.approx(expected)


def test_two_non_labels_count_as_equal_as_in_lamp():
    # LaMP compares mapped indices, so a gold outside the label set and any non-label output are both -1.
    assert metrics.accuracy(["zzz"], ["yyy"], ["a", "b"]) == 1.0


# --- LaMP-3 worst case ----------------------------------------------------------------------------------


def test_rating_worst_case_is_the_farther_end_of_the_scale():
    assert metrics.rating_value(" 4 ", "2") == 4.0
    assert metrics.rating_value("4.5", "2") == 4.5
    assert metrics.rating_value("five", "5") == 1.0  # |1-5| = 4 > |5-5| = 0
    assert metrics.rating_value("", "2") == 5.0  # |1-2| = 1 < |5-2| = 3
    assert metrics.rating_value("x", "3") == 5.0  # a tie: LaMP's ">" test picks 5
    assert metrics.rating_value("nan", "1") == 5.0  # Python parses "nan"; it still is no rating
    assert metrics.rating_value("?", "4", scale=(1.0, 6.0)) == 1.0  # bfi's 1-6: |1-4| = 3 > |6-4| = 2


def test_mae_and_rmse_with_unparseable_outputs():
    golds = ["1", "3", "5", "2", "4"]
    preds = ["2", "x", "five", "", "4.5"]
    # values 2, 5, 1, 5, 4.5 -> errors 1, 2, 4, 3, 0.5
    assert metrics.mae(golds, preds) == pytest.approx(10.5 / 5)
    assert metrics.rmse(golds, preds) == pytest.approx(math.sqrt((1 + 4 + 16 + 9 + 0.25) / 5))


def test_rating_scale_comes_from_numeric_labels():
    result = metrics.score("rating", ["4"], ["?"], ["u"], labels=[str(i) for i in range(1, 7)])
    assert result["pooled"]["mae"] == 3.0  # worst case 1 on a 1-6 scale
    assert metrics.score("rating", ["4"], ["?"], ["u"])["pooled"]["mae"] == 3.0  # 1-5: |1-4| = 3 > 1 -> 1


LIKERT = ["very inaccurate", "moderately inaccurate", "neither", "moderately accurate", "very accurate"]


def test_text_rating_labels_count_as_their_position_in_the_given_order():
    assert metrics.rating_values(LIKERT) == {label: float(i) for i, label in enumerate(LIKERT, start=1)}
    assert metrics.rating_values(["1", "2", "3"]) is None  # numbers count as themselves
    golds = ["very accurate", "neither", "very inaccurate", "moderately accurate"]
    preds = ["moderately accurate", " neither ", "Very inaccurate", "4"]
    # positions 5, 3, 1, 4 against 4, 3, worst case, worst case: "Very inaccurate" and "4" are no label,
    # so the farther end of 1..5: |1-1| = 0 < |5-1| = 4 -> 5; |1-4| = 3 > |5-4| = 1 -> 1. Errors 1, 0, 4, 3.
    result = metrics.score("rating", golds, preds, ["a", "a", "b", "b"], labels=LIKERT)
    assert result["pooled"]["mae"] == pytest.approx(8 / 4)
    assert result["pooled"]["rmse"] == pytest.approx(math.sqrt((1 + 0 + 16 + 9) / 4))
    assert result["per_user"]["mae"] == {"a": 0.5, "b": 3.5}
    # the order given is the order scored: the same answers on the reversed scale err the same way
    reverse = metrics.score("rating", golds, preds, ["a", "a", "b", "b"], labels=LIKERT[::-1])
    assert reverse["pooled"]["mae"] == pytest.approx(result["pooled"]["mae"])


def test_a_text_rating_gold_off_the_scale_or_without_labels_is_named():
    with pytest.raises(ValueError, match="'sometimes' is not one of the rating labels"):
        metrics.score("rating", ["sometimes"], ["neither"], ["u"], labels=LIKERT)
    with pytest.raises(ValueError, match=r"'neither' is not a number.*labels in order"):
        metrics.score("rating", ["neither"], ["neither"], ["u"])


# --- ROUGE -------------------------------------------------------------------------------------------------


def test_rouge_without_stemmer_as_lamp_scores_it():
    gold, pred = "The cats are running home", "  a cat runs home "
    # tokens: the cats are running home (5) / a cat runs home (4); only "home" overlaps:
    # P 1/4, R 1/5 -> F 2 * 0.05 / 0.45 = 2/9, and the longest common subsequence is that one word too.
    values = metrics.rouge_per_example([gold], [pred])
    assert values["rouge1"][0] == pytest.approx(2 / 9)
    assert values["rougeL"][0] == pytest.approx(2 / 9)


def test_rouge_with_stemmer_on_request():
    # Porter stems words longer than 3 letters: cats -> cat, running -> run, runs -> run; cat, run, home
    # overlap: P 3/4, R 3/5 -> F 2/3, and they are in the same order, so ROUGE-L is the same.
    values = metrics.rouge_per_example(["The cats are running home"], ["a cat runs home"], stemmer=True)
    assert values["rouge1"][0] == pytest.approx(2 / 3)
    assert values["rougeL"][0] == pytest.approx(2 / 3)


def test_rouge_l_differs_from_rouge_1_when_order_differs():
    # unigrams all overlap (F 1) but the longest common subsequence of "a b c" and "c b a" is one word.
    values = metrics.rouge_per_example(["alpha beta gamma"], ["gamma beta alpha"])
    assert values["rouge1"][0] == pytest.approx(1.0)
    assert values["rougeL"][0] == pytest.approx(1 / 3)


# --- PEFT-U lenient matching ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("piece", "labels", "expected"),
    [
        ("offensive.", HATEXPLAIN, "offensive"),
        (" normal'", HATEXPLAIN, "normal"),
        ("hate", HATEXPLAIN, "hatespeech"),  # a substring of a label maps to it
        ("speech", HATEXPLAIN, "hatespeech"),
        ("Offensive", HATEXPLAIN, "Offensive"),  # case matters: no label contains it
        ("surprised", GOEMOTION, "surprise"),  # "ed" dropped, then a substring of "surprise"
        ("annoying", GOEMOTION, "annoy"),  # "ing" dropped, still no label
        ("hateful", GABHATE, "Non-hateful"),  # PEFT-U's rule: the first label containing it
        ("", HATEXPLAIN, ""),  # empty stays empty (PEFT-U would map it to the first label)
    ],
)
def test_lenient_label(piece, labels, expected):
    assert metrics.lenient_label(piece, labels) == expected


def test_lenient_correct_single_and_multi_label():
    assert metrics.lenient_correct("offensive", "Offensive.", HATEXPLAIN) is False
    assert metrics.lenient_correct("offensive", "offensive.", HATEXPLAIN) is True
    assert metrics.lenient_correct("offensive", "normal, offensive", HATEXPLAIN) is True
    assert metrics.lenient_correct("normal", "", HATEXPLAIN) is False
    assert metrics.lenient_correct("Hateful", "hateful", GABHATE) is False
    assert metrics.lenient_correct("Non-hateful", "hateful", GABHATE) is True
    # multi-label: correct if any predicted label is gold; the gold may be a tuple or PEFT-U's ", " join
    assert metrics.lenient_correct(("anger", "surprise"), "joy, surprise", GOEMOTION) is True
    assert metrics.lenient_correct("anger, surprise", "joy,surprised", GOEMOTION) is True
    assert metrics.lenient_correct(("anger", "surprise"), "joy", GOEMOTION) is False


def test_peftu_accuracy_is_averaged_per_user():
    golds = ["normal", "offensive", "hatespeech"]
    preds = ["normal.", "normal", "hate"]
    users = ["a", "a", "b"]
    result = metrics.score(["lenient_accuracy"], golds, preds, users, labels=HATEXPLAIN)
    # user a: 1 of 2 right -> 0.5; user b: 1 of 1 -> 1.0; per-user mean 0.75; pooled 2 of 3.
    assert result["per_user"]["lenient_accuracy"] == {"a": 0.5, "b": 1.0}
    assert result["user_mean"]["lenient_accuracy"] == pytest.approx(0.75)
    assert result["pooled"]["lenient_accuracy"] == pytest.approx(2 / 3)


# --- score(): pooled, per user, shapes --------------------------------------------------------------------


def test_score_classification_pooled_and_per_user():
    labels = ["[1]", "[2]"]
    golds = ["[1]", "[2]", "[1]", "[2]"]
    preds = ["[1]", "[1]", "1", "[2]"]
    result = metrics.score("classification", golds, preds, ["u1", "u1", "u2", "u2"], labels=labels)
    assert result["metrics"] == ["accuracy", "f1"]
    assert result["n_examples"] == 4 and result["n_users"] == 2
    assert result["pooled"]["accuracy"] == 0.5
    assert result["per_user"]["accuracy"] == {"u1": 0.5, "u2": 0.5}
    # u1: golds [1],[2] preds [1],[1] -> [1]: P 1/2 R 1 F 2/3; [2]: F 0 -> 1/3.
    # u2: golds [1],[2] preds -1,[2] -> [1]: F 0; [2]: P 1 R 1 F 1 -> 1/2. Only labels the user met count.
    assert result["per_user"]["f1"]["u1"] == pytest.approx(1 / 3)
    assert result["per_user"]["f1"]["u2"] == pytest.approx(1 / 2)
    assert result["user_mean"]["f1"] == pytest.approx(5 / 12)
    assert result["lower_is_better"] == []


def test_score_rating_and_generation_report_direction():
    result = metrics.score("rating", ["1", "5"], ["2", "5"], ["a", "b"])
    assert result["pooled"] == {"mae": 0.5, "rmse": pytest.approx(math.sqrt(0.5))}
    assert result["per_user"]["mae"] == {"a": 1.0, "b": 0.0}
    assert result["lower_is_better"] == ["mae", "rmse"]
    generation = metrics.score("generation", ["a b", "c d"], ["a b", "x y"], ["a", "b"])
    assert generation["pooled"]["rouge1"] == 0.5
    assert generation["per_user"]["rougeL"] == {"a": 1.0, "b": 0.0}


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.score("classification", ["a"], ["a", "b"], ["u"])
    with pytest.raises(ValueError, match="no examples"):
        metrics.score("classification", [], [], [])
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score(["bleu"], ["a"], ["a"], ["u"])


def test_missing_prediction_counts_as_empty_output():
    result = metrics.score("classification", ["a", "b"], [None, "b"], ["u", "u"], labels=["a", "b"])
    assert result["pooled"]["accuracy"] == 0.5


# --- bootstrap ---------------------------------------------------------------------------------------------


def test_bootstrap_ci_of_constant_values_is_a_point():
    assert metrics.bootstrap_ci({"a": 0.5, "b": 0.5, "c": 0.5}) == (0.5, 0.5)


def test_bootstrap_ci_of_two_users():
    # resampled means of [0, 1] are 0, 0.5, 1 with chances 1/4, 1/2, 1/4: a 95% interval spans 0 to 1,
    # a 40% interval only the middle value.
    assert metrics.bootstrap_ci([0.0, 1.0], n_resamples=4000) == (0.0, 1.0)
    assert metrics.bootstrap_ci([0.0, 1.0], n_resamples=4000, level=0.4) == (0.5, 0.5)


def test_bootstrap_ci_is_deterministic_and_order_free():
    values = {f"u{i}": float(i % 7) / 7 for i in range(50)}
    shuffled = dict(reversed(list(values.items())))
    assert metrics.bootstrap_ci(values, seed=1) == metrics.bootstrap_ci(shuffled, seed=1)
    low, high = metrics.bootstrap_ci(values)
    assert low < np.mean(list(values.values())) < high
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([])
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([1.0], level=1.5)


def test_paired_bootstrap_hand_cases():
    a = {"u1": 0.9, "u2": 0.8, "u3": 0.7}
    b = {"u1": 0.5, "u2": 0.5, "u3": 0.5}
    # a is better on every user, so no resample favours b: p = (0 + 1) / (n + 1).
    assert metrics.paired_bootstrap(a, b, n_resamples=999) == pytest.approx(1 / 1000)
    # the other way round every resample has a not better: p = (n + 1) / (n + 1).
    assert metrics.paired_bootstrap(b, a, n_resamples=999) == 1.0
    # identical results: a gain of 0 is "not better".
    assert metrics.paired_bootstrap(a, a, n_resamples=99) == 1.0


def test_paired_bootstrap_half_and_half():
    # gains +1 and -1: resampled mean gains are +1, 0, -1 with chances 1/4, 1/2, 1/4, so 3/4 are <= 0.
    p = metrics.paired_bootstrap([1.0, 0.0], [0.0, 1.0], n_resamples=20000)
    assert p == pytest.approx(0.75, abs=0.015)


def test_paired_bootstrap_lower_is_better_and_mismatched_users():
    errors_a, errors_b = {"u1": 0.5, "u2": 0.6}, {"u1": 1.0, "u2": 1.2}
    assert metrics.paired_bootstrap(errors_a, errors_b, n_resamples=99, lower_is_better=True) == 0.01
    assert metrics.paired_bootstrap(errors_a, errors_b, n_resamples=99) == 1.0
    with pytest.raises(ValueError, match="different users"):
        metrics.paired_bootstrap({"u1": 1.0}, {"u2": 1.0})
    with pytest.raises(ValueError, match="not the same users"):
        metrics.paired_bootstrap([1.0, 2.0], [1.0])
