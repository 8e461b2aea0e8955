"""The engine over every registered kind: token losses, scoring, candidates and generation of mixed-user
batches give each row what that row gives alone. (Row-by-row equality of logits, with stock PEFT and with
the bare model in slot 0, is the kinds' contract: tests/kinds/test_contract.py.)"""

from __future__ import annotations

import pytest
import torch

from kind_helpers import ALL_KINDS, PROMPTS, personalize
from tailorlm.engine.bank import EngineError
from tailorlm.engine.engine import Row
from tailorlm.engine.generation import DecodeConfig


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_token_nll_matches_full_logits(kind, make_engine):
    engine = make_engine(kind)
    personalize(engine, [1, 2])
    batch = engine.encode([Row(p, t, s) for (p, t), s in zip(PROMPTS, [1, 2, 0, 1], strict=True)])
    with torch.no_grad():
        sums, counts = engine.token_nll(batch)
        logits = engine.logits(batch)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch.labels[:, 1:]
    mask = labels != -100
    expected = -(log_probs.gather(2, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(1)
    torch.testing.assert_close(sums, expected, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == mask.sum(1).tolist()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_generation_mixed_batch_equals_rows_alone(kind, make_engine):
    engine = make_engine(kind)
    personalize(engine, [1, 2], noise=0.3)
    prompts = [p for p, _ in PROMPTS]
    slots = [1, 0, 2, 1]
    decode = DecodeConfig(max_new_tokens=5)
    together = engine.generate(prompts, slots, decode)
    alone = [engine.generate([p], [s], decode)[0] for p, s in zip(prompts, slots, strict=True)]
    assert together == alone
    sampled = DecodeConfig(max_new_tokens=5, do_sample=True, seed=3)
    assert engine.generate(prompts, slots, sampled) == engine.generate(prompts, slots, sampled)


def test_generation_stops_at_stop_string(make_engine):
    engine = make_engine("lora")
    free = engine.generate(["Hello"], [0], DecodeConfig(max_new_tokens=8))[0]
    assert free, "the tiny model should produce some text"
    stop = free.split()[0][:2]
    cut = engine.generate(["Hello"], [0], DecodeConfig(max_new_tokens=8, stop=(stop,)))[0]
    assert stop not in cut and free.startswith(cut)


def test_score_prefers_the_likelier_continuation(make_engine):
    engine = make_engine("lora")
    prompt = "one two three four five six seven"
    repeated = " ".join([prompt] * 3)
    scores = engine.score([Row(repeated, " eight", 0), Row(repeated, " zebra", 0)])
    assert len(scores) == 2 and all(s < 0 for s in scores)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_score_labels_equals_scoring_each_label_as_a_row(kind, make_engine):
    engine = make_engine(kind)
    personalize(engine, [1, 2])
    prompts = [p for p, _ in PROMPTS]
    slots = [1, 0, 2, 1]
    candidates = ["yes", "no", "perhaps not", "a much longer answer"]
    shared = engine.score_labels(prompts, slots, candidates, batch_size=3)
    for i, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
        alone = engine.score([Row(prompt, candidate, slot) for candidate in candidates])
        assert shared[i] == pytest.approx(alone, abs=1e-4)


@pytest.mark.parametrize("kind", ["lora", "prompt", "label-bias"])
def test_labels_scored_in_parts_equal_scored_at_once(kind, make_engine, monkeypatch):
    """Parts of one candidate each (the smallest budget) and logits a few tokens at a time give every
    candidate the score the single pass gives (tolerance 1e-5: the same arithmetic, other batch shapes)."""
    from tailorlm.engine import engine as engine_module

    engine = make_engine(kind)
    personalize(engine, [1, 2])
    prompts = [p for p, _ in PROMPTS]
    slots = [1, 0, 2, 1]
    candidates = ["yes", "no", "perhaps not", "a much longer answer", "x"]
    whole = engine.score_labels(prompts, slots, candidates, batch_size=3)
    monkeypatch.setattr(engine_module, "LABEL_POSITIONS", 1)
    monkeypatch.setattr(engine_module, "LOGIT_ROWS", 3)
    assert engine_module.labels_per_part(3, 40, 5) == 1
    parts = engine.score_labels(prompts, slots, candidates, batch_size=3)
    for got, want in zip(parts, whole, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_label_memory_grows_with_the_request_and_is_capped_by_the_parts(make_engine):
    engine = make_engine("lora")
    one = engine.label_memory(1, 100, 2, 3)
    assert engine.label_memory(1, 200, 2, 3) > one  # a longer prompt
    assert engine.label_memory(1, 100, 2, 30) > one  # longer candidates
    # More candidates than fit in one part cost no more than one part's worth.
    from tailorlm.engine.engine import labels_per_part

    most = labels_per_part(1, 100, 3)
    assert engine.label_memory(1, 100, most * 10, 3) == engine.label_memory(1, 100, most, 3)


def test_bad_slots_and_batches_are_named_errors(make_engine):
    engine = make_engine("lora", slots=3)
    with pytest.raises(EngineError, match="slot 3 is out of range"):
        engine.encode([Row("x", "y", 3)])
    with pytest.raises(EngineError, match="empty batch"):
        engine.encode([])
    with pytest.raises(EngineError, match="2 prompts but 1 slots"):
        engine.generate(["a", "b"], [0])
    with pytest.raises(EngineError, match="2 prompts but 1 slots"):
        engine.score_labels(["a", "b"], [0], ["yes"])
    with pytest.raises(EngineError, match="no labels to score"):
        engine.score_labels(["a"], [0], [])
