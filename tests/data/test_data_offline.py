"""The four offline tasks, read from the installed packages: sizes, splits, texts, and no leaks."""

from __future__ import annotations

import time

import pytest

from tailorlm.data import DataError, UnknownTaskError, load_task, render
from tailorlm.data.stats import summarize


def test_verbagg_is_316_people_by_24_situations(offline_task, no_leak):
    task = offline_task("verbagg")
    assert len(task.users) == 316 and task.count() == 316 * 24
    assert task.labels == ("no", "perhaps", "yes")
    assert all((len(u.train), len(u.val), len(u.test)) == (20, 2, 2) for u in task.users)
    user = task.user("1")
    assert user.fields == {"anger": 20, "gender": "M"}
    by_key = {e.item_key: e for e in user.examples()}
    assert len(by_key) == 24
    # the package spells this item "S4wantCurse"; the key is rebuilt from its columns
    assert by_key["S4WantCurse"].text == (
        "The operator disconnects me when I used up my last 10 cents for a call. I would want to curse."
    )
    assert (
        by_key["S2DoShout"].text
        == "I miss a train because a clerk gave me faulty information. I would shout."
    )
    assert no_leak(task) == 316 * 24


def test_verbagg_disagreement_matches_the_published_figure(offline_task):
    summary = summarize(offline_task("verbagg"))
    # OFFLINE-DATA.md: a person's answer equals the item's majority answer 55% of the time
    assert summary["disagreement"]["rate"] == pytest.approx(0.45, abs=0.01)
    assert summary["distinct_items"] == 24


def test_bfi_is_2800_people_with_ipip_statements(offline_task, no_leak):
    task = offline_task("bfi")
    assert len(task.users) == 2800
    assert task.labels == ("1", "2", "3", "4", "5", "6") and task.kind == "rating"
    sizes = [len(u.examples()) for u in task.users]
    assert min(sizes) >= 10 and max(sizes) == 25
    first = task.user("61617")
    a1 = next(e for e in first.examples() if e.item_key == "A1")
    assert (a1.text, a1.target) == ("Am indifferent to the feelings of others.", "2")
    assert summarize(task)["disagreement"]["rate"] == pytest.approx(0.69, abs=0.01)
    no_leak(task, train_checks_per_user=2)


def test_movielens_is_943_users_and_100000_ratings_split_by_time(offline_task, no_leak):
    task = offline_task("movielens")
    assert len(task.users) == 943 and task.count() == 100_000
    assert task.chronological and task.labels == ("1", "2", "3", "4", "5")
    for user in task.users:
        train_end = max(e.time for e in user.train)
        assert train_end <= min(e.time for e in user.val) and max(e.time for e in user.val) <= min(
            e.time for e in user.test
        )
    user = task.user("1")
    assert user.history[0].time <= user.history[-1].time
    movie = next(e for e in user.examples() if e.item_key == "1")
    assert movie.text == "Toy Story (1995); genres: Animation, Children's, Comedy"
    assert task.history_for(user, user.train[5]) == user.history[:5]
    assert task.history_for(user, user.test[0]) == user.history
    no_leak(task, train_checks_per_user=3)


def test_tate_keeps_artists_with_ten_works(offline_task, no_leak):
    task = offline_task("tate")
    assert len(task.users) == 116 and task.count() == 2886
    assert task.kind == "generation" and task.labels is None
    assert all(len(u.examples()) >= 10 for u in task.users)
    example = task.users[0].test[0]
    assert example.item_key is None and ", " in example.text
    assert summarize(task)["disagreement"] is None
    no_leak(task)


def test_splits_are_deterministic_from_the_seed(offline_task):
    first, again, other = offline_task("verbagg"), load_task("verbagg", seed=0), offline_task("verbagg", 1)

    def test_ids(task):
        return [e.id for u in task.users for e in u.test]

    assert test_ids(first) == test_ids(again)
    assert test_ids(first) != test_ids(other)


def test_offline_tasks_take_no_folder():
    with pytest.raises(UnknownTaskError, match="installed package"):
        load_task("verbagg", data_dir="/tmp")


def test_loading_is_fast():
    # CPU time of this process, not wall time: a parallel test worker training a model must not make this
    # fail. About 1.5 s here; the bound leaves room for slower machines.
    started = time.process_time()
    load_task("movielens")
    assert time.process_time() - started < 10.0


@pytest.mark.parametrize("name", ["verbagg", "bfi", "movielens", "tate"])
def test_offline_prompts_render(offline_task, name):
    task = offline_task(name)
    user = task.users[0]
    example = user.test[0]
    shots = user.train[:2]
    text = render.prompt(task, example, shots=shots, retrieved=task.history_for(user, example)[:2])
    lines = text.splitlines()
    # instruction, retrieved header and two items, two shots, the query
    assert len(lines) == 7
    assert lines[0] == task.spec.instruction
    assert lines[1] == task.spec.template("retrieved_header")
    assert lines[4] == render.fill(
        task.spec.template("shot"), {"text": shots[0].text, "target": shots[0].target}
    )
    assert lines[-1] == render.fill(task.spec.template("query"), {"text": example.text})


def test_items_can_be_held_out_for_every_user(offline_task):
    """``--split items``: the same answers, split by item across users, so no training answer of anyone is
    about a test or validation item; seeded; a timeline cannot be split so."""
    per_user = offline_task("verbagg")
    task = load_task("verbagg", split="items", seed=0)
    test_items = {e.item_key for u in task.users for e in u.test}
    val_items = {e.item_key for u in task.users for e in u.val}
    train_items = {e.item_key for u in task.users for e in u.train}
    assert (len(test_items), len(val_items)) == (5, 2)  # 20% and 10% of 24, rounded half up
    assert not train_items & (test_items | val_items) and not test_items & val_items
    assert "items held out for every user: 5 test, 2 validation of 24, seed 0" in task.source
    by_id = {u.id: u for u in per_user.users}
    for user in task.users:
        assert {e.id for e in user.examples()} == {e.id for e in by_id[user.id].examples()}
        assert [h.id for h in user.history] == [e.id for e in user.train]
        assert all(task.history_for(user, e) == user.history for e in user.test)
    again, other = load_task("verbagg", split="items", seed=0), load_task("verbagg", split="items", seed=1)
    assert [e.id for e in again.users[0].test] == [e.id for e in task.users[0].test]
    assert {e.item_key for u in other.users for e in u.test} != test_items
    with pytest.raises(DataError, match="task movielens is a timeline"):
        load_task("movielens", split="items")
    with pytest.raises(UnknownTaskError, match="installed package"):
        load_task("verbagg", split="dev")
