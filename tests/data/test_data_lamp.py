"""LaMP files: user-based and time-based questions load, prompts are written the LaMP way, predictions are
written back in the outputs format and scored as LaMP scores them; malformed files name the problem."""

from __future__ import annotations

import json
import math

import pytest

from tailorlm.data import DataError, UnknownTaskError, lamp, load_task, render


def _load(fixtures, folder, name, split):
    return load_task(name, data_dir=fixtures / "lamp" / folder, split=split)


def test_user_based_questions_are_one_user_each(fixtures, no_leak):
    task = _load(fixtures, "lamp2", "lamp:2", "dev")
    assert (task.kind, task.metrics, len(task.labels)) == ("classification", ("accuracy", "f1"), 15)
    assert [u.id for u in task.users] == ["2001", "2002"]
    user = task.user("2001")
    assert [e.id for e in user.test] == ["2001"] and user.test[0].target == "sci-fi"
    assert user.val == []
    # dated profiles are in time order; undated ones keep the file's order
    assert [h.id for h in user.history] == ["20011", "20010", "20012"]
    assert [h.id for h in task.user("2002").history] == ["20020", "20021"]
    assert user.history[0].text == "A baker falls for the rival baker across the street."
    assert no_leak(task) > 0


def test_profile_items_become_training_examples_that_see_only_earlier_items(fixtures):
    task = _load(fixtures, "lamp2", "lamp:2", "dev")
    user = task.user("2001")
    trained = task.training_examples(user)
    assert [e.source_id for e in trained] == ["20011", "20010", "20012"]
    assert [e.target for e in trained] == ["romance", "sci-fi", "twist ending"]
    assert trained[0].text.startswith("Which tag does this movie relate to")
    assert trained[0].text.endswith("description: A baker falls for the rival baker across the street.")
    assert [h.id for h in task.history_for(user, trained[0])] == []
    assert [h.id for h in task.history_for(user, trained[2])] == ["20011", "20010"]
    assert [h.id for h in task.history_for(user, user.test[0])] == ["20011", "20010", "20012"]


def test_lamp2_prompt_query_and_word_budget(fixtures):
    task = _load(fixtures, "lamp2", "lamp:2", "dev")
    user = task.user("2001")
    question = user.test[0]
    assert render.query(task, question) == "A lighthouse keeper finds a robot washed up on the shore."
    items = task.history_for(user, question)
    text = render.prompt(task, question, retrieved=items[:2])
    assert text == (
        'the tag for the movie: "A baker falls for the rival baker across the street." is "romance" , and '
        'the tag for the movie: "Two astronauts argue about a broken oxygen pump." is "sci-fi" . '
        + question.text
    )
    # 16 words for two items: 8 each, so the 10-word description is cut after 8 words.
    budgeted = render.prompt(task, question, retrieved=[items[2], items[0]], budget_words=16)
    assert '"A clerk discovers the city is a simulation." is "twist ending"' in budgeted
    assert '"A baker falls for the rival baker across" is "romance"' in budgeted
    # 18 words: 9 each; the 8-word item leaves one word to the next, as LaMP carries unused tokens over,
    # so the 10-word description fits whole.
    budgeted = render.prompt(task, question, retrieved=[items[2], items[0]], budget_words=18)
    assert '"A baker falls for the rival baker across the street." is "romance"' in budgeted
    with_profile = render.prompt(task, question, profile="Likes quiet films.")
    assert with_profile == "Likes quiet films.\n" + question.text


def test_lamp1_titles_go_after_the_word_title(fixtures):
    task = _load(fixtures, "lamp1", "lamp:1", "test")
    user = task.users[0]
    question = user.test[0]
    assert render.query(task, question) == "Low-rank updates of language models Soil moisture in dry valleys"
    text = render.prompt(task, question, retrieved=task.history_for(user, question))
    assert text.startswith(
        'For an author who has written the paper with the title, and "Prompt tuning at scale", and '
        '"Serving many adapters" "Sparse adapters for many users", which reference is related?'
    )
    assert task.training_examples(user)[0].target == "Prompt tuning at scale"


def test_time_based_questions_group_by_user_and_see_only_their_own_profile(fixtures, no_leak):
    task = _load(fixtures, "lamp3_time", "lamp:3", "dev")
    assert [u.id for u in task.users] == ["alice", "bob"]
    alice = task.user("alice")
    assert [e.id for e in alice.test] == ["3101", "3102"]
    assert [h.id for h in alice.history] == ["a2", "a1", "a3", "a4"]
    # a4 is the review question 3101 asks about: it is in 3102's profile only, so it is never trained on
    # and never shown for 3101.
    assert [e.source_id for e in task.training_examples(alice)] == ["a2", "a1", "a3"]
    assert [e.target for e in alice.train] == ["2", "5", "3"]  # the score 3 was a JSON number
    assert [h.id for h in task.history_for(alice, alice.test[0])] == ["a2", "a1", "a3"]
    assert [h.id for h in task.history_for(alice, alice.test[1])] == ["a2", "a1", "a3", "a4"]
    assert [h.id for h in task.user("bob").history] == ["b2", "b1"]  # dates "2017" < "2018"
    assert no_leak(task) > 0


def test_lamp7_uses_the_text_after_the_first_colon(fixtures):
    task = _load(fixtures, "lamp7", "lamp:7", "train")
    user = task.user("701")
    question = user.test[0]
    assert render.query(task, question) == "I am so tired of waiting for the bus every morning"
    assert [(e.text, e.target) for e in task.training_examples(user)] == [
        ("Write a tweet in your own words:", "another monday, another missed bus"),
        ("Write a tweet in your own words:", "coffee first, questions later"),
    ]
    text = render.prompt(task, question, retrieved=task.history_for(user, question))
    assert text == (
        '"another monday, another missed bus" , and "coffee first, questions later"  '
        "are written by a person. Following the given patterns " + question.text
    )


def test_predictions_round_trip_and_score_like_lamp(fixtures, tmp_path):
    task = _load(fixtures, "lamp2", "lamp:2", "dev")
    path = lamp.write_predictions(task, {"2002": "Action", "2001": "sci-fi"}, tmp_path / "preds.json")
    written = json.loads(path.read_text())
    assert written == {
        "task": "LaMP_2",
        "golds": [{"id": "2001", "output": "sci-fi"}, {"id": "2002", "output": "Action"}],
    }
    result = lamp.score_files(fixtures / "lamp" / "lamp2" / "dev_outputs.json", path)
    # "Action" is not exactly a label: accuracy 1/2; macro-F1 over all 15 tags: sci-fi 1, the rest 0.
    assert result["task"] == "LaMP_2" and result["spec"] == "lamp:2"
    assert result["pooled"] == {"accuracy": 0.5, "f1": pytest.approx(1 / 15)}
    assert result["user_mean"]["f1"] == 0.5
    with pytest.raises(DataError, match="differ from the golds"):
        lamp.write_predictions(task, {"2001": "sci-fi"}, tmp_path / "short.json")


def test_lamp3_scores_with_worst_case_and_per_user_from_questions(fixtures, tmp_path):
    folder = fixtures / "lamp" / "lamp3_time"
    preds = tmp_path / "preds.json"
    outputs = [{"id": "3101", "output": "4"}, {"id": "3102", "output": "five"}, {"id": "3201", "output": "2"}]
    preds.write_text(json.dumps({"task": "LaMP_3", "golds": outputs}))
    result = lamp.score_files(folder / "dev_outputs.json", preds, folder / "dev_questions.json")
    # errors: 0; "five" against gold 1 -> worst case 5 -> 4; 2 against 3 -> 1
    assert result["pooled"]["mae"] == pytest.approx(5 / 3)
    assert result["pooled"]["rmse"] == pytest.approx(math.sqrt(17 / 3))
    assert result["per_user"]["mae"] == {"alice": 2.0, "bob": 1.0}
    assert result["n_users"] == 2


def test_lamp2_golds_pick_movie_or_news_labels(tmp_path):
    golds = tmp_path / "golds.json"
    golds.write_text(json.dumps({"task": "LaMP_2", "golds": [{"id": "1", "output": "sports"}]}))
    assert lamp.score_files(golds, golds)["spec"] == "lamp:2-news"
    golds.write_text(json.dumps({"task": "LaMP_2N", "golds": [{"id": "1", "output": "sports"}]}))
    assert lamp.score_files(golds, golds)["spec"] == "lamp:2-news"
    golds.write_text(json.dumps({"task": "LaMP_9", "golds": [{"id": "1", "output": "x"}]}))
    with pytest.raises(DataError, match="unknown LaMP task"):
        lamp.score_files(golds, golds)


# --- malformed files -----------------------------------------------------------------------------------


def _edit(folder, name, edit):
    path = folder / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _edit_questions(folder, edit):
    return _edit(folder, "dev_questions.json", edit)


QUESTIONS, OUTPUTS = "dev_questions.json", "dev_outputs.json"
MALFORMED = {
    "missing input": (QUESTIONS, lambda d: d[0].pop("input"), "question 2001", "'input'"),
    "input not text": (QUESTIONS, lambda d: d[0].update(input=["a"]), "question 2001", "'input'"),
    "profile not a list": (QUESTIONS, lambda d: d[0].update(profile="none"), "question 2001", "'profile'"),
    "profile item without tag": (
        QUESTIONS,
        lambda d: d[0]["profile"][0].pop("tag"),
        "question 2001 / profile item 20010",
        "'tag'",
    ),
    "id of the wrong type": (QUESTIONS, lambda d: d[1].update(id=["2002"]), "#1", "'id'"),
    "duplicate id": (QUESTIONS, lambda d: d[1].update(id="2001"), "id 2001", "'id'"),
    "bad date": (
        QUESTIONS,
        lambda d: d[0]["profile"][0].update(date="last spring"),
        "question 2001 / profile item 20010",
        "'date'",
    ),
    "user_id on one question only": (
        QUESTIONS,
        lambda d: d[1].update(user_id="x"),
        "question 2002",
        "'user_id'",
    ),
    "wrong task": (OUTPUTS, lambda d: d.update(task="LaMP_3"), None, "'task'"),
    "gold missing": (OUTPUTS, lambda d: d["golds"].pop(), None, "'id'"),
    "gold not a label": (
        OUTPUTS,
        lambda d: d["golds"][0].update(output="space opera"),
        "id 2001",
        "'output'",
    ),
    "gold without output": (OUTPUTS, lambda d: d["golds"][0].pop("output"), "golds #0", "'output'"),
    "golds not a list": (OUTPUTS, lambda d: d.update(golds={}), None, "'golds'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_lamp_files_name_file_record_and_field(copy_fixture, case):
    name, edit, record, field = MALFORMED[case]
    folder = copy_fixture("lamp/lamp2")
    path = _edit(folder, name, edit)
    with pytest.raises(DataError) as raised:
        load_task("lamp:2", data_dir=folder, split="dev")
    message = str(raised.value)
    assert str(path) in message and f"field {field}" in message, message
    if record:
        assert f"record {record}" in message, message


def test_news_profile_loaded_as_movies_gets_a_hint(copy_fixture):
    folder = copy_fixture("lamp/lamp2")

    def to_news(data):
        item = data[0]["profile"][0]
        item["category"] = item.pop("tag")

    _edit_questions(folder, to_news)
    with pytest.raises(DataError, match="lamp:2-news"):
        load_task("lamp:2", data_dir=folder, split="dev")


def test_a_profile_item_that_differs_between_questions_is_inconsistent(copy_fixture):
    folder = copy_fixture("lamp/lamp3_time")
    _edit_questions(folder, lambda d: d[1]["profile"][0].update(score="1"))
    with pytest.raises(DataError, match="differs between questions"):
        load_task("lamp:3", data_dir=folder, split="dev")


def test_missing_files_and_splits(fixtures, copy_fixture):
    folder = copy_fixture("lamp/lamp2")
    (folder / "dev_outputs.json").unlink()
    with pytest.raises(DataError, match=r"dev_outputs\.json"):
        load_task("lamp:2", data_dir=folder, split="dev")
    with pytest.raises(DataError, match=r"train_questions\.json"):
        load_task("lamp:2", data_dir=fixtures / "lamp" / "lamp2", split="train")
    with pytest.raises(UnknownTaskError, match="no split"):
        load_task("lamp:2", data_dir=fixtures / "lamp" / "lamp2", split="validation")


def test_scoring_refuses_mismatched_predictions(fixtures, tmp_path):
    golds = fixtures / "lamp" / "lamp2" / "dev_outputs.json"
    preds = tmp_path / "preds.json"
    preds.write_text(
        json.dumps(
            {"task": "LaMP_2", "golds": [{"id": "2001", "output": "sci-fi"}, {"id": "9", "output": "x"}]}
        )
    )
    with pytest.raises(DataError) as raised:
        lamp.score_files(golds, preds)
    message = str(raised.value)
    assert str(preds) in message and "field 'id'" in message and "missing 1 (2002)" in message
    assert "unexpected 1 (9)" in message
    preds.write_text(json.dumps({"task": "LaMP_3", "golds": [{"id": "2001", "output": "1"}]}))
    with pytest.raises(DataError, match="field 'task'"):
        lamp.score_files(golds, preds)
