"""Shared prompt prefixes: rows of one slot run their common start once, with the same losses, gradients,
trained modules and candidate scores as running every row whole.

Tolerances (fp32, tiny 2-layer model): the shared and plain paths do the same arithmetic on differently
shaped tensors (a prefix pass plus a suffix pass instead of one pass), so they differ only by float
rounding in reductions (matmul and softmax sums over other lengths). Measured differences are ~2e-6 on
summed token losses of ~10-60 and ~5e-7 of the largest gradient entry; the bounds below leave a 4-5x
margin: summed losses atol 1e-5 + rtol 1e-5, gradients 2e-6 of each tensor's largest entry, trained
modules as in the together-vs-alone training test (atol 2e-5, rtol 1e-4, Adam amplifies rounding).
"""

from __future__ import annotations

import pytest
import torch

from tailorlm import kinds, models
from tailorlm.engine.engine import Engine, Row
from tailorlm.engine.prefix import PrefixPlan, common_prefix_length, plan_batch, plan_prefixes
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, UserData

KINDS = list(kinds.MODEL_KINDS)
INSTRUCTION = (
    "You will read a short statement written by a person about an everyday situation. Decide whether "
    "the writer would agree with it, answering with one word only: yes, no or perhaps. Take the "
    "writer's earlier answers into account and keep your answer short. Some statements are sarcastic: "
    "read them as the writer meant them. Some are about other people: answer for the writer, not for "
    "them. When the writer's earlier answers disagree with each other, follow the most recent ones. "
)
ITEMS = [
    "The bus did not stop for me this morning.",
    "Someone took my seat.",
    "A neighbour plays loud music late at night, every night of the week.",
    "The shop gave me the wrong change.",
    "My colleague never answers email.",
    "It rained all weekend.",
    "The train was cancelled twice.",
]


def _engine(tokenizer, kind: str, share: bool = True, **options) -> Engine:
    """A fresh tiny base per engine (the engine wraps its base in place) with slots 1..3 personalised:
    distinct non-identity modules, so a row continuing from the wrong user's prefix would show."""
    engine = Engine(
        models.tiny_model(seed=0, tokenizer=tokenizer),
        kinds.default_spec(kind),
        slots=5,
        share_prefix=share,
        **options,
    )
    generator = torch.Generator().manual_seed(1)
    for slot in (1, 2, 3):
        engine.bank.reset(slot, generator)
        noisy = {
            n: t + 0.05 * torch.randn(t.shape, generator=generator) for n, t in engine.bank.read(slot).items()
        }
        engine.bank.write(slot, noisy)
    return engine


def _prompt(tokenizer, item: str) -> str:
    return models.chat_prompt(tokenizer, INSTRUCTION + item)


def _rows(tokenizer) -> list[Row]:
    """Several users with a long common instruction: identical prompts with different targets (slot 1),
    a prompt that is the start of another one (slot 2), bare-model rows (slot 0) and a user with a single
    row (slot 3), interleaved."""
    asked = _prompt(tokenizer, ITEMS[2])
    return [
        Row(_prompt(tokenizer, ITEMS[0]), " yes", 1),
        Row(asked, " no", 2),
        Row(_prompt(tokenizer, ITEMS[1]), " perhaps not at all", 0),
        Row(_prompt(tokenizer, ITEMS[0]), " no", 1),
        Row(asked + "I think", " yes", 2),
        Row(_prompt(tokenizer, ITEMS[3]), " yes", 3),
        Row(_prompt(tokenizer, ITEMS[4]), " no", 0),
        Row(_prompt(tokenizer, ITEMS[5]), " perhaps", 1),
    ]


def _user_losses(sums: torch.Tensor, counts: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """The trainer's objective: per user (slot) the mean over their own target tokens, summed."""
    index = torch.tensor(slots)
    return sum(sums[index == s].sum() / counts[index == s].sum() for s in set(slots))


def _nll_and_grads(engine: Engine, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, dict, int]:
    batch = engine.encode(rows)
    engine.positions_run = 0
    with engine.training():
        sums, counts = engine.token_nll(batch)
        _user_losses(sums, counts, [r.slot for r in rows]).backward()
        grads = {name: tensor.grad.clone() for name, tensor in engine.bank.tensors.items()}
        for tensor in engine.bank.tensors.values():
            tensor.grad = None
    return sums.detach(), counts, grads, engine.positions_run


def _assert_sharing_changes_nothing(engine: Engine, rows: list[Row]) -> tuple[int, int]:
    """Shared and plain token losses, counts and bank gradients agree; returns both position counts."""
    engine.share_prefix = True
    shared_sums, shared_counts, shared_grads, shared_positions = _nll_and_grads(engine, rows)
    engine.share_prefix = False
    sums, counts, grads, positions = _nll_and_grads(engine, rows)
    torch.testing.assert_close(shared_sums, sums, atol=1e-5, rtol=1e-5)
    assert torch.equal(shared_counts, counts)
    for name, grad in grads.items():
        scale = float(grad.abs().max())
        difference = float((shared_grads[name] - grad).abs().max())
        assert difference <= 4e-6 * max(scale, 1e-12), (name, difference, scale)
    # every user in the batch got a gradient, through their shared prefix too
    for slot in {r.slot for r in rows} - {0}:
        assert any(float(g[slot].abs().max()) > 0 for g in shared_grads.values()), slot
    return shared_positions, positions


@pytest.mark.parametrize("kind", KINDS)
def test_shared_prefix_losses_and_gradients_equal_running_rows_whole(kind, tokenizer):
    rows = _rows(tokenizer)
    engine = _engine(tokenizer, kind)
    plan = plan_batch(engine.encode(rows))
    assert plan is not None and min(plan.lengths) > 100, "these rows should be worth sharing"
    shared_positions, positions = _assert_sharing_changes_nothing(engine, rows)
    assert shared_positions < 0.7 * positions


@pytest.mark.parametrize("kind", KINDS)
def test_a_group_sharing_nothing_rides_along_with_groups_that_share(kind, tokenizer):
    # slot 2's short rows have no common start: its prefix row is empty (all padding, plus prompt
    # tuning's virtual tokens) and its rows run whole in the suffix pass
    rows = [Row(_prompt(tokenizer, item), " yes", 1) for item in ITEMS[:4]]
    rows += [Row("Hello there", " no", 2), Row("Why not", " yes", 2)]
    engine = _engine(tokenizer, kind)
    plan = plan_batch(engine.encode(rows))
    assert plan is not None and plan.lengths[1] == 0 and plan.lengths[0] > 100
    shared_positions, positions = _assert_sharing_changes_nothing(engine, rows)
    assert shared_positions < positions


@pytest.mark.parametrize("kind", KINDS)
def test_training_with_shared_prefixes_equals_training_without(kind, tokenizer):
    def user(name: str, size: int, offset: int) -> UserData:
        pairs = [
            (_prompt(tokenizer, ITEMS[(offset + i) % len(ITEMS)]), " yes" if (i + offset) % 2 else " no")
            for i in range(size + 2)
        ]
        return UserData(name, pairs[:size], pairs[size:])

    # batch_size 2 over 5 rows: the last batch of each epoch is a single-row user
    users = [user("ann", 5, 0), user("bob", 3, 2), user("cy", 4, 4)]
    config = TrainConfig(epochs=2, batch_size=2, learning_rate=1e-2, micro_batch_rows=4, warmup_ratio=0.2)
    results, positions = {}, {}
    for share in (True, False):
        engine = _engine(tokenizer, kind, share=share)
        results[share] = {r.user_id: r for r in MultiUserTrainer(engine, config).run(users)}
        positions[share] = engine.positions_run
    for user_id, plain in results[False].items():
        shared = results[True][user_id]
        assert shared.steps == plain.steps
        for name, value in plain.module.items():
            torch.testing.assert_close(shared.module[name], value, atol=2e-5, rtol=1e-4)
        assert shared.train_losses == pytest.approx(plain.train_losses, abs=1e-5)
        assert shared.val_losses == pytest.approx(plain.val_losses, abs=1e-5)
    assert positions[True] < 0.8 * positions[False]


@pytest.mark.parametrize("kind", KINDS)
def test_score_labels_with_shared_prefixes_equal_without(kind, tokenizer):
    engine = _engine(tokenizer, kind)
    # one user's items interleaved with others': scoring batches them by user so their prompts share
    prompts = [_prompt(tokenizer, item) for item in ITEMS] * 2
    slots = [1, 2, 1, 0, 3, 1, 2, 2, 1, 0, 1, 3, 2, 1]
    candidates = ["yes", "no", "perhaps not"]
    engine.positions_run = 0
    shared = engine.score_labels(prompts, slots, candidates, batch_size=6)
    shared_positions = engine.positions_run
    scored = engine.score([Row(p, " " + candidates[1], s) for p, s in zip(prompts, slots, strict=True)])
    engine.share_prefix = False
    engine.positions_run = 0
    plain = engine.score_labels(prompts, slots, candidates, batch_size=6)
    plain_positions = engine.positions_run
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(plain), atol=1e-5, rtol=1e-5)
    rows = [Row(p, " " + candidates[1], s) for p, s in zip(prompts, slots, strict=True)]
    torch.testing.assert_close(torch.tensor(scored), torch.tensor(engine.score(rows)), atol=1e-5, rtol=1e-5)
    assert shared_positions < 0.7 * plain_positions


# ---- the plan ------------------------------------------------------------------------------------


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 6]]) == 2
    assert common_prefix_length([[1], [2]]) == 0


def test_identical_prompts_share_all_but_their_last_prompt_token():
    prompt = list(range(100, 140))
    rows = [[*prompt, 1, 2], [*prompt, 3], [*prompt, 1, 2]]
    plan = plan_prefixes(rows, [40, 40, 40], [1, 1, 1], min_saved=1)
    assert plan == PrefixPlan(group_of_row=(0, 0, 0), representatives=(0,), lengths=(39,))
    # 1 prefix row of 39 + 3 suffix rows of 3 (last prompt token + 2 targets), against 3 rows of 42
    assert plan.positions([len(r) for r in rows]) == (39 + 3 * 3, 3 * 42)


def test_a_prompt_that_is_the_start_of_another_keeps_its_last_token():
    short = list(range(100, 130))
    rows = [[*short, 7, 8], short + list(range(200, 210)) + [9]]
    plan = plan_prefixes(rows, [30, 40], [2, 2], min_saved=1)
    assert plan.lengths == (29,)
    # rows without a target keep their last token out of the prefix too (candidates continue from it)
    assert plan_prefixes([short, short], [30, 30], [0, 0], min_saved=1).lengths == (29,)


def test_groups_are_slots_and_a_single_row_group_runs_its_prompt_in_the_prefix_pass():
    head = list(range(100, 150))
    rows = [[*head, 1, 2, 3], [*head, 4, 5, 6], [*head, 1, 2, 3], [*head, 7, 8, 9]]
    plan = plan_prefixes(rows, [51, 51, 51, 51], [1, 2, 1, 3], min_saved=1)
    assert plan.group_of_row == (0, 1, 0, 2)
    assert plan.representatives == (0, 1, 3)
    # groups of one row share their whole prompt but the last token with nobody: it costs what it saves
    assert plan.lengths == (50, 50, 50)
    assert plan.positions([53] * 4) == (3 * 50 + 4 * 3, 4 * 53)


def test_no_plan_when_sharing_does_not_pay():
    head = list(range(100, 150))
    # the same tokens in different slots: different modules, nothing to share
    assert plan_prefixes([[*head, 1], [*head, 1]], [50, 50], [1, 2], min_saved=1) is None
    # nothing in common
    assert plan_prefixes([[1, 2, 3], [4, 5, 6]], [2, 2], [1, 1], min_saved=1) is None
    # a prefix too short to pay for a second decoder call
    assert plan_prefixes([[*head, 1], [*head, 2]], [50, 50], [1, 1], min_saved=64) is None
    assert plan_prefixes([[*head, 1], [*head, 2]], [50, 50], [1, 1], min_saved=49) is not None


def test_a_poorly_shared_group_narrows_every_prefix():
    head = list(range(100, 200))
    rows = [[*head, 1], [*head, 2], [5] * 60 + [1], [6] * 60 + [2]]
    # slot 2's rows share nothing, so each of its rows' 61 tokens must run in the suffix pass; slot 1's
    # prefix is then only worth what does not fit there: 101 - 61 = 40 tokens
    plan = plan_prefixes(rows, [100, 100, 60, 60], [1, 1, 2, 2], min_saved=1)
    assert plan.lengths == (40, 0)
    assert plan.positions([101, 101, 61, 61]) == (2 * 40 + 4 * 61, 4 * 101)


def test_plan_of_an_encoded_batch_and_rows_cut_by_max_length(tokenizer):
    engine = _engine(tokenizer, "lora", max_length=48)
    asked = _prompt(tokenizer, ITEMS[0])
    assert len(tokenizer(asked)["input_ids"]) > 48
    # cut identically (same prompt, same target length): they still share all but the last prompt token
    same = [Row(asked, " yes", 1), Row(asked, " no", 1)]
    target = len(tokenizer(" yes", add_special_tokens=False)["input_ids"]) + 1  # + end of sequence
    assert plan_batch(engine.encode(same), min_saved=1).lengths == (48 - target - 1,)
    # cut at different places: the kept ends no longer start alike
    cut = [Row(asked, " yes", 1), Row(asked + " Think.", " yes", 1)]
    assert plan_batch(engine.encode(cut), min_saved=1) is None
    for rows in (same, cut):
        engine.share_prefix = True
        shared = engine.score(rows)
        engine.share_prefix = False
        assert shared == pytest.approx(engine.score(rows), abs=1e-5)


def test_training_with_random_dropout_runs_every_row_whole(tokenizer):
    """LoRA dropout draws a mask per position: shared prefix positions would share one draw among the
    rows, which is not what each row gets alone, so a kind that says it is not exact when shared runs
    plainly in training (and still shares when only scoring)."""
    spec = kinds.default_spec("lora")
    dropping = type(spec)(rank=spec.rank, alpha=spec.alpha, dropout=0.1, targets=spec.targets)
    assert not kinds.of(dropping).exact_when_shared(dropping)
    engine = Engine(models.tiny_model(seed=0, tokenizer=tokenizer), dropping, slots=5)
    batch = engine.encode(_rows(tokenizer))
    plain = batch.input_ids.numel()
    with engine.training():
        engine.positions_run = 0
        engine.token_nll(batch)
        assert engine.positions_run == plain
    with torch.no_grad():
        engine.positions_run = 0
        engine.token_nll(batch)
        assert engine.positions_run < plain
