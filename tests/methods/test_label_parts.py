"""A user's label part: the fusion and its tuning, a per-user option selected on the user's own
validation items, and parts as weight and bias giving the prior, the fusion and the bias (values, not
shapes). The bias fit itself is tested in ``tests/train/test_joint.py``."""

from __future__ import annotations

import math

import pytest
import torch

from tailorlm.data.schema import Example, Task, User
from tailorlm.data.specs import TaskSpec
from tailorlm.methods import label_parts

LABELS = ("yes", "perhaps", "no")


def test_fusion_weight_zero_is_the_prior_and_one_the_shared_model():
    shared = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), -1)
    prior = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    torch.testing.assert_close(label_parts.fuse(shared, prior, 0.0), prior, atol=1e-6, rtol=0)
    torch.testing.assert_close(label_parts.fuse(shared, prior, 1.0), shared, atol=1e-6, rtol=0)
    half = label_parts.fuse(shared, prior, 0.5).exp()
    expected = (shared.exp() * prior.exp()).sqrt()
    torch.testing.assert_close(half, expected / expected.sum(), atol=1e-6, rtol=0)


def _example(user: str, item: str, target: str) -> Example:
    return Example(f"{user}/{item}", f"item {item}", target, (target,), item_key=item)


@pytest.fixture
def three_users() -> Task:
    spec = TaskSpec("toy", "offline", "toy", "classification", LABELS, ("accuracy",), "label-model tests")
    users = [
        User(u, train=[_example(u, "t", "yes")], val=[_example(u, f"v{i}", t) for i, t in enumerate(vals)])
        for u, vals in (("ann", ["yes", "yes"]), ("bob", ["no", "no"]), ("cid", ["perhaps", "perhaps"]))
    ]
    return Task("toy", "classification", LABELS, ("accuracy",), users, spec)


def _always(label: str):
    def source(queries, purpose):
        row = torch.log(torch.tensor([0.8 if x == label else 0.1 for x in LABELS]))
        return row.expand(len(queries), -1)

    return source


def test_tuning_keeps_the_best_setting_and_ties_go_to_the_safest(three_users):
    golds = ["yes", "no", "no"]
    chosen, values = label_parts.best_setting(
        three_users, (0.0, 0.5, 1.0), golds, lambda w: ["yes", "no", "no"] if w == 0.5 else ["no"] * 3
    )
    assert chosen == 0.5 and values[0.5] == 1.0 and math.isclose(values[0.0], 2 / 3)
    tie, _ = label_parts.best_setting(three_users, (0.0, 0.5, 1.0), golds, lambda w: ["no"] * 3)
    assert tie == 0.0


def _select(task: Task, sources, min_items: int = 1) -> dict[str, str]:
    val = label_parts.queries_of(task.users, "val", task)
    predictions = {o: label_parts.decide(task, source(val, "validate")) for o, source in sources.items()}
    return label_parts.select_per_user(task, task.users, val, predictions, min_items)


def test_each_user_gets_the_option_best_on_their_own_validation_items(three_users):
    sources = {"prior": _always("perhaps"), "bias": _always("no"), "module": _always("yes")}  # simplest first
    assert _select(three_users, sources) == {"ann": "module", "bob": "bias", "cid": "prior"}
    # Below the stated minimum of validation items a user's own selection would be noise: every user then
    # gets the option best over all users' items (here a tie of all three, so the simplest).
    assert max(len(u.val) for u in three_users.users) < label_parts.MIN_SELECT_ITEMS
    assert _select(three_users, sources, label_parts.MIN_SELECT_ITEMS) == dict.fromkeys(
        ["ann", "bob", "cid"], "prior"
    )
    assert _select(three_users, sources, len(three_users.user("ann").val)) == _select(three_users, sources)
    # cid's items now split between the module's answer and the bias's: a tie on cid's own items goes to
    # the option best over every user's items, and between equals (here 3 of 6 each) to the simpler.
    cid = three_users.user("cid")
    cid.val[:] = [_example("cid", "v0", "yes"), _example("cid", "v1", "no")]
    assert _select(three_users, sources) == {"ann": "module", "bob": "bias", "cid": "bias"}


def test_label_parts_as_weight_and_bias_give_the_prior_the_fusion_and_the_bias(three_users):
    """``UserParts.apply`` is the label-bias kind's arithmetic: scale 0 and the log prior answer the prior,
    scale w and (1 - w) log prior answer ``fuse``, scale 1 and b answer the shared distribution plus b,
    renormalised."""
    shared = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]), -1)
    queries = [(three_users.user("ann"), None), (three_users.user("bob"), None)]
    log_prior = {
        "ann": torch.log(torch.tensor([0.2, 0.3, 0.5])),
        "bob": torch.log(torch.tensor([0.6, 0.3, 0.1])),
    }
    prior = torch.stack([log_prior["ann"], log_prior["bob"]])
    as_prior = label_parts.UserParts({u: (p, 0.0) for u, p in log_prior.items()}, {}).apply(shared, queries)
    torch.testing.assert_close(as_prior, prior, atol=1e-6, rtol=0)
    fused = label_parts.UserParts(label_parts._fused(log_prior, 0.3), {}).apply(shared, queries)
    torch.testing.assert_close(fused, label_parts.fuse(shared, prior, 0.3), atol=1e-6, rtol=0)
    bias = torch.tensor([0.5, -0.5, 0.0])
    biased = label_parts.UserParts({"ann": (bias, 1.0), "bob": (bias, 1.0)}, {}).apply(shared, queries)
    torch.testing.assert_close(biased, torch.log_softmax(shared + bias, dim=-1), atol=1e-6, rtol=0)
