"""The blend's part: the statistics score what the baselines answer (the prior exactly, the damped biases
by Surprise's own ALS step), a user's row is folded in from their answers alone, warmth counts an item's
answers, the part reads back as it was written and answers the same, and a damaged part is one error
naming the file and the field."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tailorlm.data import load_task
from tailorlm.data.schema import Example
from tailorlm.methods.baselines import LabelPrior, answer_rule, label_by_rule, suited_label
from tailorlm.methods.blend_part import (
    META_FILE,
    Blender,
    BlendPart,
    BlendPartError,
    ItemStatistics,
    part_for,
)


@pytest.fixture(scope="module")
def fitted():
    task = load_task("verbagg", seed=0)
    return task, ItemStatistics.fit(task, task.users[:8])


def test_the_prior_source_is_the_user_item_prior(fitted):
    task, statistics = fitted
    prior = LabelPrior(task)
    for user in task.users[:3]:
        row = statistics.row(task.training_examples(user))
        for example in user.test:
            expected = torch.log(torch.tensor(prior.distribution(user, example)))
            torch.testing.assert_close(
                statistics.features(row, example.item_key)[0], expected, atol=1e-6, rtol=0
            )


def test_the_biases_are_folded_in_as_surprises_als_step(fitted):
    """``b_u = sum(r - mu - b_i) / (penalty + n)`` over the user's answered items: the update Surprise's
    ALS makes for a user given the items (here with the penalty chosen on the tuning users)."""
    task, statistics = fitted
    biases = statistics.ratings["biases"]
    assert biases.size == 0 and biases.penalty > 0
    user = task.users[5]
    answers = [
        (e.item_key, float(task.labels.index(e.targets[0])))
        for e in task.training_examples(user)
        if e.item_key is not None
    ]
    expected = sum(r - biases.mean - biases.bias[i] for i, r in answers) / (biases.penalty + len(answers))
    row = statistics.row(task.training_examples(user))
    assert float(row.ratings["biases"][0]) == pytest.approx(expected, abs=1e-5)
    assert row.ratings["mf"].shape == (statistics.ratings["mf"].size + 1,)
    # A rating source scores the label nearest its estimate highest: -|position - r| peaks at r.
    item = answers[0][0]
    estimate = biases.predict(row.ratings["biases"], item)
    best = int(statistics.features(row, item)[1].argmax())
    assert best == min(range(len(task.labels)), key=lambda i: abs(i - estimate))


def test_a_user_with_no_answers_is_the_average_user_and_warmth_counts_answers(fitted):
    task, statistics = fitted
    row = statistics.row([])
    torch.testing.assert_close(row.prior, statistics.prior)
    assert all(not bool(vector.any()) for vector in row.ratings.values())
    counts = {item: float(c.sum()) for item, c in statistics.counts.items()}
    most = max(counts, key=counts.get)
    assert statistics.warmth(most) == pytest.approx(1.0)
    assert statistics.warmth("never-answered") == statistics.warmth(None) == 0.0
    # An item nobody answered: the item prior is the global one, the prior source is the user's alone.
    user = task.users[0]
    own = statistics.row(task.training_examples(user))
    torch.testing.assert_close(
        statistics.features(own, "never-answered")[0].exp().double(), own.prior, atol=1e-6, rtol=0
    )
    # Answers that are not a label, or have no item, count toward nothing they cannot inform.
    odd = [
        Example(id="a", text="t", target="not a label", targets=("not a label",), item_key=most),
        Example(id="b", text="t", target=task.labels[0], targets=(task.labels[0],), item_key=None),
    ]
    folded = statistics.row(odd)
    assert all(not bool(vector.any()) for vector in folded.ratings.values())
    assert int(folded.prior.argmax()) == 0


def test_a_part_reads_back_and_answers_the_same(fitted, tmp_path):
    task, statistics = fitted
    sources = (*statistics.sources, "model")
    blender = Blender(sources, torch.tensor([0.5, 0.3, 0.2, 0.7]), torch.tensor([0.4, -0.1, 0.2, -0.5]),
                      torch.tensor([0.1, -0.2, 0.05]))  # fmt: skip
    part = part_for(task, statistics, blender, "f" * 64, "shared")
    assert part.rule == answer_rule(task) and part.uses_model
    part.save(tmp_path / "part")
    again = BlendPart.load(tmp_path / "part")
    model = torch.log_softmax(torch.tensor([0.3, -1.0, 0.2]), dim=-1)
    for user in task.users[:4]:
        row, row_again = (p.statistics.row(task.training_examples(user)) for p in (part, again))
        for example in user.test:
            expected = part.distribution(row, example.item_key, model)
            torch.testing.assert_close(again.distribution(row_again, example.item_key, model), expected)
            # The blend is the blender's scores of the stacked features and the model's row.
            features = torch.cat([statistics.features(row, example.item_key), model[None]])
            warmth = torch.tensor([statistics.warmth(example.item_key)])
            torch.testing.assert_close(expected, blender.scores(features[None], warmth)[0])
            answer = label_by_rule(part.rule, part.labels, expected.exp().tolist())
            assert answer == suited_label(task, expected.exp().tolist())
    with pytest.raises(ValueError, match="model source"):
        part.distribution(part.statistics.row([]), None, None)


def _write(folder, meta=None, tensors=None):
    if meta is not None:
        (folder / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    if tensors is not None:
        save_file(tensors, str(folder / "items.safetensors"))


def _damage(meta: dict, tensors: dict, case: str) -> tuple[dict, dict]:
    """One hand-made fault per case: what a damaged or foreign part folder could hold."""
    nan = float("nan")
    narrow = tensors["mf.factors"][:, :3].contiguous()
    edits = {
        "meta not an object": lambda: ([1, 2], tensors),
        "a label twice": lambda: ({**meta, "labels": [meta["labels"][0]] * 3}, tensors),
        "one label": lambda: ({**meta, "labels": meta["labels"][:1]}, tensors),
        "an int item key": lambda: ({**meta, "items": [7, *meta["items"][1:]]}, tensors),
        "an item twice": lambda: ({**meta, "items": [meta["items"][0], *meta["items"][:-1]]}, tensors),
        "an unknown rule": lambda: ({**meta, "rule": "vote"}, tensors),
        "a NaN prior": lambda: ({**meta, "prior": [nan, *meta["prior"][1:]]}, tensors),
        "a prior not summing to one": lambda: ({**meta, "prior": [0.5] * len(meta["labels"])}, tensors),
        "a boolean weight": lambda: (
            {**meta, "blender": {**meta["blender"], "cold": [True] * len(meta["blender"]["cold"])}},
            tensors,
        ),
        "an unknown source": lambda: (
            {**meta, "blender": {**meta["blender"], "sources": ["prior", "oracle"]}},
            tensors,
        ),
        "a zero penalty": lambda: (
            {**meta, "ratings": {**meta["ratings"], "mf": {**meta["ratings"]["mf"], "penalty": 0}}},
            tensors,
        ),
        "an inf mean": lambda: (
            {**meta, "ratings": {**meta["ratings"], "biases": {**meta["ratings"]["biases"], "mean": 1e999}}},
            tensors,
        ),
        "a task adapter that is a number": lambda: ({**meta, "task_adapter": 3}, tensors),
        "a model source the blender lacks": lambda: ({**meta, "model": "shared"}, tensors),
        "a model source blended but not named": lambda: (
            {**meta, "blender": {**meta["blender"], "sources": [*meta["blender"]["sources"], "model"]}},
            tensors,
        ),
        "NaN factors": lambda: (meta, {**tensors, "mf.factors": tensors["mf.factors"] * nan}),
        "negative counts": lambda: (meta, {**tensors, "counts": -tensors["counts"]}),
        "integer counts": lambda: (meta, {**tensors, "counts": tensors["counts"].long()}),
        "a missing bias": lambda: (meta, {k: t for k, t in tensors.items() if k != "biases.bias"}),
        "an extra tensor": lambda: (meta, {**tensors, "extra": torch.zeros(1)}),
        "factors of the wrong width": lambda: (meta, {**tensors, "mf.factors": narrow}),
    }
    return edits[case]()


DAMAGE = [
    "meta not an object", "a label twice", "one label", "an int item key", "an item twice", "an unknown rule",
    "a NaN prior", "a prior not summing to one", "a boolean weight", "an unknown source", "a zero penalty",
    "an inf mean", "a task adapter that is a number", "a model source the blender lacks",
    "a model source blended but not named", "NaN factors", "negative counts", "integer counts",
    "a missing bias", "an extra tensor", "factors of the wrong width",
]  # fmt: skip


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_part_is_one_error_naming_it(fitted, tmp_path, case):
    task, statistics = fitted
    blender = Blender(statistics.sources, torch.ones(3), torch.zeros(3), torch.zeros(3))
    good = tmp_path / "good"
    part_for(task, statistics, blender, None).save(good)
    meta = json.loads((good / META_FILE).read_text())
    tensors = load_file(str(good / "items.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad, *_damage(meta, tensors, case))
    with pytest.raises(BlendPartError, match=str(bad)):
        BlendPart.load(bad)


def test_a_folder_that_is_not_a_part_says_so(tmp_path):
    with pytest.raises(BlendPartError, match=r"not a blend part.*blend\.json"):
        BlendPart.load(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    save_file({"counts": torch.zeros(1, 2)}, str(tmp_path / "items.safetensors"))
    with pytest.raises(BlendPartError, match="not a readable blend part"):
        BlendPart.load(tmp_path)


def test_a_task_without_ordered_labels_blends_the_prior_alone(tmp_path):
    task = load_task("verbagg", seed=0)
    task.spec = dataclasses.replace(task.spec, options={**task.spec.options, "ordinal": False})
    assert not task.ordinal
    statistics = ItemStatistics.fit(task, task.users[:4])
    assert statistics.sources == ("prior",) and not statistics.ratings
    part = part_for(
        task, statistics, Blender(("prior",), torch.ones(1), torch.zeros(1), torch.zeros(3)), None
    )
    assert part.rule == "mode"
    part.save(tmp_path / "part")
    again = BlendPart.load(tmp_path / "part")
    row = again.statistics.row(task.training_examples(task.users[0]))
    item = task.users[0].test[0].item_key
    torch.testing.assert_close(again.distribution(row, item, None), part.distribution(row, item, None))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_history_and_item_give_a_finite_distribution(fitted, data):
    """Whatever a user's history holds (labels or other text, known items, unknown ones, none, the same
    item many times) and whatever item is asked: finite features and a distribution that sums to one."""
    task, statistics = fitted
    known = sorted(statistics.counts)
    keys = st.one_of(st.none(), st.sampled_from(known), st.text(max_size=8))
    targets = st.one_of(st.sampled_from(task.labels), st.text(max_size=5))
    answers = data.draw(st.lists(st.tuples(keys, targets), max_size=40))
    examples = [
        Example(id=str(i), text="t", target=target, targets=(target,), item_key=key)
        for i, (key, target) in enumerate(answers)
    ]
    row = statistics.row(examples)
    item = data.draw(keys)
    features = statistics.features(row, item)
    assert bool(torch.isfinite(features).all())
    blender = Blender((*statistics.sources, "model"), torch.ones(4), torch.ones(4), torch.zeros(3))
    part = part_for(task, statistics, blender, None, "module")
    model = torch.log_softmax(
        torch.tensor(data.draw(st.lists(st.floats(-1e4, 1e4), min_size=3, max_size=3))), -1
    )
    found = part.distribution(row, item, model)
    assert bool(torch.isfinite(found).all()) and float(found.exp().sum()) == pytest.approx(1.0, abs=1e-5)
