"""Decodings beyond plain choice. Calibrated: the content-free prompt keeps the real prompt's context and
blanks only the query; the answer is the label whose log-probability gains most over that prior. Median:
for ordered labels, the label where the distribution's cumulative mass reaches one half."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tailorlm.bench import runner
from tailorlm.bench.config import BenchConfig
from tailorlm.data import load_task, render
from tailorlm.methods.decoding import answer, check_decoding, decode_calibrated, decode_median
from tailorlm.methods.recipes import PromptBuilder, Recipe

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"


class FixedScores:
    """Stands in for the engine's label scorer so the arithmetic of calibration is checked exactly."""

    def __init__(self, by_prompt: dict[str, list[float]]) -> None:
        self.by_prompt = by_prompt

    def score_labels(self, prompts, slots, labels, batch_size=16):
        return [self.by_prompt[p] for p in prompts]


def test_calibration_subtracts_the_content_free_prior():
    labels = ["no", "perhaps", "yes"]
    engine = FixedScores(
        {
            "q1": [-2.0, -3.0, -0.5],  # plain choice says "yes" ...
            "cf1": [-3.0, -3.5, -0.2],  # ... but the prompt alone already pulls to "yes" harder
            "q2": [-1.0, -2.0, -3.0],
            "cf2": [-1.0, -2.0, -3.0],  # no gain anywhere: ties keep the first label
        }
    )
    assert decode_calibrated(engine, labels, ["q1", "q2"], ["cf1", "cf2"], [0, 0]) == ["no", "no"]
    task = load_task("verbagg")
    assert answer(engine, task, ["q1"], [0], "likelihood") == ["yes"]
    with pytest.raises(ValueError, match="content-free prompt"):
        answer(engine, task, ["q1"], [0], "calibrated")


def test_content_free_prompt_keeps_shots_and_blanks_the_query():
    task = load_task("verbagg")
    user = next(u for u in task.users if u.test and len(task.training_examples(u)) > 3)
    example = user.test[0]
    builder = PromptBuilder(task, tokenizer=None, recipe=Recipe(shots=True))
    real = builder.text(user, example)
    blank = builder.text(user, example, content_free=True)
    real_lines, blank_lines = real.splitlines(), blank.splitlines()
    assert real_lines[:-1] == blank_lines[:-1]  # instruction and the same shots
    assert example.text not in blank_lines[-1]
    assert blank_lines[-1] == "Situation: N/A Answer:"


@pytest.mark.parametrize(
    ("task_name", "folder", "split", "kept"),
    [
        ("lamp:2", "lamp/lamp2", "dev", "description: N/A"),
        ("lamp:1", "lamp/lamp1", "test", 'with the title "N/A"'),
    ],
)
def test_content_free_lamp_question_keeps_its_wording(task_name, folder, split, kept):
    task = load_task(task_name, data_dir=FIXTURES / folder, split=split)
    example = next(u for u in task.users if u.test).test[0]
    blank = render.content_free(task, example)
    assert kept in blank.text
    assert render.query(task, example) not in blank.text
    assert blank.id == example.id


def test_bench_runs_calibrated_likelihood_and_says_so(tmp_path):
    config = BenchConfig(model="tiny", test_users=3, adapter_users=2, adapter_examples=8, epochs=1)
    runner.run("verbagg", tmp_path, ["few-shot@calibrated", "zero-shot"], config)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["methods"]["few-shot@calibrated"]["decoding"] == "calibrated"
    assert results["methods"]["zero-shot"]["decoding"] == "likelihood"
    lines = (tmp_path / "predictions" / "few-shot@calibrated.jsonl").read_text().splitlines()
    predictions = {e["prediction"] for line in lines for e in json.loads(line)["examples"]}
    assert predictions <= {"no", "perhaps", "yes"}


def test_calibrated_decoding_needs_a_label_set(tmp_path):
    config = BenchConfig(model="tiny", test_users=2)
    with pytest.raises(ValueError, match="no label set"):
        runner.run("tate", tmp_path, ["zero-shot@calibrated"], config)


def _log(probabilities: list[float]) -> list[float]:
    return [math.log(p) for p in probabilities]


def test_median_takes_the_middle_of_the_mass_not_its_peak():
    labels = ["1", "2", "3", "4", "5"]
    engine = FixedScores(
        {
            "split": _log([0.4, 0.05, 0.1, 0.05, 0.4]),  # two peaks at the ends: the median is 3
            "top": _log([0.1, 0.1, 0.1, 0.1, 0.6]),
            "low": _log([0.7, 0.1, 0.1, 0.05, 0.05]),
            "unnormalised": [x - 7.0 for x in _log([0.2, 0.2, 0.05, 0.1, 0.45])],
        }
    )
    prompts = ["split", "top", "low", "unnormalised"]
    assert decode_median(engine, labels, prompts, [0] * 4) == ["3", "5", "1", "4"]
    movielens = load_task("movielens")
    assert answer(engine, movielens, ["split"], [0], "likelihood") == ["1"]
    assert answer(engine, movielens, ["split"], [0], "median") == ["3"]
    assert decode_median(engine, labels, [], []) == []


def test_median_needs_ordered_labels():
    assert check_decoding(load_task("verbagg"), "median") == "median"  # no < perhaps < yes
    tags = load_task("lamp:2", data_dir=FIXTURES / "lamp" / "lamp2", split="dev")
    with pytest.raises(ValueError, match="no order"):
        check_decoding(tags, "median")


def test_a_decodings_former_name_is_its_current_one():
    """``choice`` was likelihood decoding's name: a run configured with it still means the same."""
    verbagg = load_task("verbagg")
    assert check_decoding(verbagg, "choice") == "likelihood"
    with pytest.raises(ValueError, match="unknown decoding 'chosen'"):
        check_decoding(verbagg, "chosen")
