"""Task specs are data shipped with the package, and the per-user splits the offline tasks make."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from tailorlm.data import available_tasks, specs, splits

PEFTU_TASKS = [
    "hatexplain",
    "gabhate",
    "measuringhatespeech",
    "tweeteval",
    "unhealthyconversations",
    "wikidetox",
    "goemotion",
    "studemo",
    "cockamamie",
    "epic",
    "subjectivediscourse_response",
    "subjectivediscourse_question_sentiment",
    "subjectivediscourse_response_sentiment",
]


def test_every_family_and_task_is_known_by_name():
    names = available_tasks()
    assert names[:4] == ["verbagg", "bfi", "movielens", "tate"]
    assert [n for n in names if n.startswith("peftu:")] == [f"peftu:{t}" for t in PEFTU_TASKS]
    assert [n for n in names if n.startswith("lamp:")] == [
        f"lamp:{k}" for k in ("1", "2", "2-news", "3", "4", "5", "6", "7")
    ]


def test_specs_carry_labels_instructions_and_templates():
    hatexplain = specs.spec("peftu:hatexplain")
    assert hatexplain.labels == ("hatespeech", "normal", "offensive")
    assert hatexplain.instruction and hatexplain.template("shot") == "Text: {text} Label: {target}"
    assert specs.spec("PEFTU:GoEmotion").kind == "multilabel"
    assert len(specs.spec("lamp:2").labels) == 15 and specs.spec("lamp:4").labels is None
    assert specs.spec("bfi").options["statements"]["O2"] == "Avoid difficult reading material."
    with pytest.raises(KeyError, match="no 'nope' template"):
        hatexplain.template("nope")


def test_every_spec_is_complete():
    for name in available_tasks():
        spec = specs.spec(name)
        assert spec.metrics and spec.description, name
        if spec.family == "lamp":
            for key in (
                "lamp_id",
                "profile_fields",
                "document",
                "query",
                "retrieved_item",
                "profile_example",
            ):
                assert key in spec.options, (name, key)
        else:
            for key in ("shot", "query", "document", "retrieved_item", "retrieved_header", "profile"):
                assert spec.template(key), (name, key)
            assert spec.instruction, name


def test_task_files_are_package_resources():
    folder = resources.files("tailorlm").joinpath("resources", "tasks")
    for family in specs.SOURCE_FAMILIES:
        assert json.loads(folder.joinpath(f"{family}.json").read_text("utf-8"))["family"] == family


def test_the_wheel_ships_the_task_files(tmp_path):
    """What pip would install from a built wheel, not just what the editable checkout has. The build runs
    on a copy so that it leaves no build/ folder in the checkout."""
    root = Path(__file__).resolve().parents[2]
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("tailorlm-*.whl"))).namelist()
    for family in specs.SOURCE_FAMILIES:
        assert f"tailorlm/resources/tasks/{family}.json" in names


def test_stratified_split_sizes_and_label_spread():
    items = [(f"k{i:02d}", "a" if i < 12 else "b" if i < 19 else "c") for i in range(24)]
    train, val, test = splits.stratified_split(items, lambda x: x[1], lambda x: x[0], "user", seed=0)
    assert (len(train), len(val), len(test)) == (20, 2, 2)
    assert sorted(train + val + test) == sorted(items)
    again = splits.stratified_split(list(reversed(items)), lambda x: x[1], lambda x: x[0], "user", seed=0)
    assert again == (train, val, test)  # the input order does not matter
    # ten items: 8 / 1 / 1 (PEFT-U drops users with fewer)
    ten = splits.stratified_split(items[:10], lambda x: x[1], lambda x: x[0], "user", seed=3)
    assert [len(part) for part in ten] == [8, 1, 1]


def test_stratified_split_spreads_each_label_over_test():
    # 100 items, labels 50 / 30 / 20: a 10-item test set gets 5 / 3 / 2, whatever the seed.
    items = [(f"k{i:03d}", "a" if i < 50 else "b" if i < 80 else "c") for i in range(100)]
    for seed in range(5):
        _, _, test = splits.stratified_split(items, lambda x: x[1], lambda x: x[0], f"u{seed}", seed=seed)
        assert sorted(label for _, label in test) == ["a"] * 5 + ["b"] * 3 + ["c"] * 2


def test_chronological_split_takes_the_latest_as_test():
    items = [(float(t), f"k{t}") for t in (5, 1, 9, 3, 7, 2, 8, 4, 6, 0, 10, 11)]
    train, val, test = splits.chronological_split(items, lambda x: x)
    # 12 items: 10% is 1.2 -> 1 test, 1 validation, 10 train, by time
    assert [t for t, _ in test] == [11.0] and [t for t, _ in val] == [10.0]
    assert [t for t, _ in train] == [float(t) for t in range(10)]
    with pytest.raises(ValueError, match="too few"):
        splits.chronological_split(items[:2], lambda x: x)
