"""The stacked blend: the blender recovers the weights that made the data (values, within a stated
tolerance), each source's weight follows the item's warmth, and a real run of ``blend`` and
``blend-stats`` (tiny model) keeps to the visibility rules, fits both on the same validation answers and
keeps parts that answer as the run did."""

from __future__ import annotations

import json
import math

import torch
from test_methods_leakage import (
    SMALL,
    Run,
    check_prompts_show_only_what_the_asker_may_see,
)

from tailorlm.bench import runner
from tailorlm.data import load_task
from tailorlm.methods import blend, blend_part, registry
from tailorlm.methods.baselines import label_by_rule
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
    truth = blend_part.Blender(("a", "b", "c"), cold, warm, bias)
    probabilities = truth.scores(features, warmth).exp()
    targets = torch.multinomial(probabilities, 1, generator=generator)[:, 0].tolist()
    fitted = blend_part.fit_blender(("a", "b", "c"), features, warmth, targets)
    torch.testing.assert_close(fitted.cold, cold, atol=0.15, rtol=0)
    torch.testing.assert_close(fitted.warm, warm, atol=0.15, rtol=0)
    # Only differences between labels' biases matter to a softmax; the penalty centres them.
    torch.testing.assert_close(fitted.bias - fitted.bias.mean(), bias - bias.mean(), atol=0.15, rtol=0)


def test_without_rows_every_label_is_equally_likely():
    fitted = blend_part.fit_blender(("a",), torch.zeros(0, 1, 3), torch.zeros(0), [])
    assert torch.equal(fitted.cold, torch.zeros(1)) and torch.equal(fitted.bias, torch.zeros(3))
    scores = fitted.scores(torch.randn(2, 1, 3), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(scores, torch.full((2, 3), -math.log(3)), atol=1e-6, rtol=0)


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
    methods = ["blend", "blend-stats", "blend+rag"]
    runner.run("verbagg", tmp_path, methods, SMALL, trace=uses.append, reporter=heard)
    run = Run(tmp_path, load_task("verbagg", seed=SMALL.seed), uses)
    check_prompts_show_only_what_the_asker_may_see(run)
    for method in methods:
        record = [
            json.loads(x) for x in (tmp_path / "predictions" / f"{method}.jsonl").read_text().splitlines()
        ]
        assert {r["user"] for r in record} == run.test_ids
    fitted = {line.split(":")[0]: line for line in heard.lines if "blended on" in line}
    assert set(fitted) == set(methods)
    rows = {method: line.split("blended on ")[1].split(" ")[0] for method, line in fitted.items()}
    assert rows["blend"] == rows["blend-stats"] == rows["blend+rag"] and int(rows["blend"]) > 0
    assert "model" in fitted["blend"] and "model" not in fitted["blend-stats"]
    validated = {u.prompt.user for u in uses if u.method == "blend" and u.purpose == "validate"}
    assert run.test_ids <= validated  # the test users' own validation answers are rows

    # Each run keeps its part; the statistics' alone answers every test item as its part does, from each
    # user's row folded in from their training answers (what a server does from their history).
    stats = blend_part.BlendPart.load(tmp_path / "modules" / "blend-stats-part-plain")
    with_model = blend_part.BlendPart.load(tmp_path / "modules" / "blend-part-plain")
    assert not stats.uses_model and stats.task_adapter is None and stats.model is None
    assert with_model.model == "shared" and with_model.task_adapter is not None
    assert with_model.statistics.sources == stats.statistics.sources == ("prior", "biases", "mf")
    # blend+rag's model reads retrieved history: its own task adapter (trained with retrieval) and part.
    retrieving = blend_part.BlendPart.load(tmp_path / "modules" / "blend+rag-part-bm25")
    assert retrieving.uses_model and retrieving.task_adapter not in (None, with_model.task_adapter)
    assert any(u.method == "blend+rag" and u.prompt.retrieved for u in uses)
    lines = (tmp_path / "predictions" / "blend-stats.jsonl").read_text().splitlines()
    answered = {e["id"]: e["prediction"] for line in lines for e in json.loads(line)["examples"]}
    checked = 0
    for user in run.task.users:
        if user.id not in run.test_ids:
            continue
        row = stats.statistics.row(run.task.training_examples(user))
        for example in user.test:
            scores = stats.distribution(row, example.item_key, None).exp().tolist()
            assert answered[example.id] == label_by_rule(stats.rule, stats.labels, scores)
            checked += 1
    assert checked == len(answered) > 0


def test_no_validation_rows_fit_a_blender_over_every_label():
    """A task whose users have no validation answers: the features keep the labels' width, so the blender
    (every weight 0) answers each label equally likely rather than failing on a width of 0."""
    from types import SimpleNamespace

    task = load_task("verbagg", seed=0)
    statistics = blend_part.ItemStatistics.fit(task, [])
    rows = blend.Rows(SimpleNamespace(task=task), statistics)
    features = rows.features([])
    assert features.shape == (0, len(statistics.sources), len(task.labels))
    fitted = blend_part.fit_blender(statistics.sources, features, rows.warmth([]), [])
    assert fitted.bias.shape == (len(task.labels),)
    user = task.users[0]
    scores = fitted.scores(rows.features([(user, user.test[0])]), rows.warmth([(user, user.test[0])]))
    torch.testing.assert_close(scores, torch.full((1, 3), -math.log(3)), atol=1e-6, rtol=0)
