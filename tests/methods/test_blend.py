"""The stacked blend: the blender recovers the weights that made the data (values, within a stated
tolerance), each source's weight follows the item's warmth, the statistics score what the baselines
answer, and a real run of ``blend`` and ``blend-stats`` (tiny model) keeps to the visibility rules and
fits both on the same validation answers."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from test_methods_leakage import (
    SMALL,
    Run,
    check_prompts_show_only_what_the_asker_may_see,
)

from tailorlm.bench import runner
from tailorlm.data import load_task
from tailorlm.methods import blend, registry
from tailorlm.methods.baselines import LabelPrior
from tailorlm.methods.recipes import PromptUse
from tailorlm.progress import Reporter


def test_the_blender_recovers_the_weights_that_made_the_data():
    """Labels drawn from ``softmax(sum_k (a_k + b_k w) f_k + c)`` with known weights: the fit recovers them
    within 0.15 (20,000 rows; the penalty's pull is 1/20,000 of the data's), a source that does not
    matter gets weights near 0, and the cold and warm weights differ as they were drawn."""
    generator = torch.Generator().manual_seed(0)
    rows, labels = 20_000, 4
    features = torch.randn(rows, 3, labels, generator=generator)
    warmth = torch.rand(rows, generator=generator)
    cold, warm, bias = (
        torch.tensor([2.0, 0.0, 0.5]),
        torch.tensor([-1.5, 0.0, 1.0]),
        torch.tensor([0.3, 0, 0, -0.3]),
    )
    truth = blend.Blender(("a", "b", "c"), cold, warm, bias)
    probabilities = truth.scores(features, warmth).exp()
    targets = torch.multinomial(probabilities, 1, generator=generator)[:, 0].tolist()
    fitted = blend.fit_blender(("a", "b", "c"), features, warmth, targets)
    torch.testing.assert_close(fitted.cold, cold, atol=0.15, rtol=0)
    torch.testing.assert_close(fitted.warm, warm, atol=0.15, rtol=0)
    # Only differences between labels' biases matter to a softmax; the penalty centres them.
    torch.testing.assert_close(fitted.bias - fitted.bias.mean(), bias - bias.mean(), atol=0.15, rtol=0)


def test_without_rows_every_label_is_equally_likely():
    fitted = blend.fit_blender(("a",), torch.zeros(0, 1, 3), torch.zeros(0), [])
    assert torch.equal(fitted.cold, torch.zeros(1)) and torch.equal(fitted.bias, torch.zeros(3))
    scores = fitted.scores(torch.randn(2, 1, 3), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(scores, torch.full((2, 3), -math.log(3)), atol=1e-6, rtol=0)


def test_the_statistics_score_what_the_baselines_know_and_warmth_counts_the_items_answers():
    task = load_task("verbagg", seed=0)
    statistics = blend.Statistics(task)
    assert statistics.names == ("prior", "biases", "mf")  # verbagg's labels are ordered
    user = task.users[0]
    queries = [(u, e) for u in task.users[:3] for e in u.test][:3]
    scores = statistics.scores(queries)
    assert scores.shape == (3, 3, len(task.labels))
    prior = LabelPrior(task)
    expected = torch.log(torch.tensor([prior.distribution(u, e) for u, e in queries]))
    torch.testing.assert_close(scores[:, 0], expected, atol=1e-6, rtol=0)
    # A rating estimate scores the label nearest it highest: -|position - r| peaks at r.
    estimate = statistics.estimators["mf"].predict(user.id, queries[0][1].item_key).est
    assert int(scores[0, 2].argmax()) == min(range(len(task.labels)), key=lambda i: abs(i - estimate))
    counts = {item: len(answers) for item, answers in prior.by_item.items()}
    most = max(counts, key=counts.get)
    unseen = dataclasses.replace(user.test[0], id="new", item_key="never-answered")
    known = next(e for u in task.users for e in u.test if e.item_key == most)
    warmth = statistics.warmth([(user, known), (user, unseen)])
    assert warmth.tolist() == pytest.approx([1.0, 0.0])


class Heard(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_a_run_of_both_blends_keeps_to_the_rules_and_fits_the_same_rows(tmp_path):
    """Both blends answer every test user; every prompt the model part scores shows only what its user may
    see; the model's blend and the statistics' alone are fitted on the same validation answers, and only
    the model's has a model weight."""
    assert {"blend", "blend-stats"} <= set(registry.methods_for(load_task("verbagg")))
    assert "blend" not in registry.methods_for(load_task("tate"))  # generation: no labels to blend
    uses: list[PromptUse] = []
    heard = Heard()
    runner.run("verbagg", tmp_path, ["blend", "blend-stats"], SMALL, trace=uses.append, reporter=heard)
    run = Run(tmp_path, load_task("verbagg", seed=SMALL.seed), uses)
    check_prompts_show_only_what_the_asker_may_see(run)
    for method in ("blend", "blend-stats"):
        record = [
            json.loads(x) for x in (tmp_path / "predictions" / f"{method}.jsonl").read_text().splitlines()
        ]
        assert {r["user"] for r in record} == run.test_ids
    fitted = {line.split(":")[0]: line for line in heard.lines if "blended on" in line}
    assert set(fitted) == {"blend", "blend-stats"}
    rows = {method: line.split("blended on ")[1].split(" ")[0] for method, line in fitted.items()}
    assert rows["blend"] == rows["blend-stats"] and int(rows["blend"]) > 0
    assert "model" in fitted["blend"] and "model" not in fitted["blend-stats"]
    validated = {u.prompt.user for u in uses if u.method == "blend" and u.purpose == "validate"}
    assert run.test_ids <= validated  # the test users' own validation answers are rows
