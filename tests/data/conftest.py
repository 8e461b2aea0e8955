"""Fixtures for the data tests: the fixture folders, loaded offline tasks, and the no-leak check every
loader must pass."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tailorlm.data import Task, load_task

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def copy_fixture(tmp_path):
    """Copy one fixture folder into tmp_path so a test may break a file without touching the original."""

    def copy(relative: str) -> Path:
        target = tmp_path / relative
        shutil.copytree(FIXTURES / relative, target)
        return target

    return copy


@pytest.fixture(scope="module")
def offline_task():
    loaded: dict[tuple[str, int], Task] = {}

    def get(name: str, seed: int = 0) -> Task:
        if (name, seed) not in loaded:
            loaded[(name, seed)] = load_task(name, seed=seed)
        return loaded[(name, seed)]

    return get


def assert_no_leak(task: Task, train_checks_per_user: int | None = None) -> int:
    """A user's val and test items never appear in their train split, their history, what is retrieved for
    any of their examples, or what their module trains on; asking an example never shows itself; on a
    timeline only earlier items are visible. Returns how many history_for calls were checked."""
    calls = 0
    for user in task.users:
        held = [*user.val, *user.test]
        held_ids = {e.id for e in held} | {e.source_id for e in held if e.source_id}
        held_keys = {e.item_key for e in user.test if e.item_key is not None}
        trained = task.training_examples(user)
        assert not held_ids & {e.id for e in user.train}, user.id
        assert not held_ids & {e.source_id or e.id for e in trained}, user.id
        assert not held_ids & {h.id for h in user.history}, user.id
        assert not held_keys & {e.item_key for e in [*user.train, *user.val] if e.item_key is not None}, (
            user.id
        )
        train_sample = user.train if train_checks_per_user is None else user.train[:train_checks_per_user]
        for example in [*held, *train_sample]:
            visible = task.history_for(user, example)
            calls += 1
            ids = {h.id for h in visible}
            assert not ids & held_ids, (user.id, example.id)
            assert example.id not in ids and (example.source_id is None or example.source_id not in ids)
            if task.chronological and example.time is not None:
                assert all(h.time is None or h.time <= example.time for h in visible), (user.id, example.id)
    return calls


@pytest.fixture
def no_leak():
    return assert_no_leak
