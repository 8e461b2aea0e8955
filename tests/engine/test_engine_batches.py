"""Mixed-user batches give each row what that row alone gives through stock PEFT or the engine."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import PROMPTS, SPECS, personalize
from peft import PeftModel

from tailorlm import models
from tailorlm.engine.bank import EngineError
from tailorlm.engine.engine import Row
from tailorlm.engine.generation import DecodeConfig
from tailorlm.kinds import ModuleSpecError
from tailorlm.store import module_folder


def _peft_logits(tokenizer, folder, prompt: str, target: str) -> torch.Tensor:
    base = models.tiny_model(seed=0, tokenizer=tokenizer).model
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = (
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
        + tokenizer(target, add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
    )
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor([ids])).logits[0]
    return logits[-len(ids) :]  # prompt tuning prepends virtual positions


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt"])
def test_mixed_batch_rows_equal_stock_peft_alone(kind, make_engine, tokenizer, tmp_path):
    engine = make_engine(kind)
    personalize(engine, [1, 2, 3])
    slots = [1, 2, 0, 3]
    rows = [Row(p, t, s) for (p, t), s in zip(PROMPTS, slots, strict=True)]
    batch = engine.encode(rows)
    with torch.no_grad():
        mixed = engine.logits(batch)
    folders = {
        s: module_folder.save_module(engine, s, tmp_path / f"user{s}", dtype="float32") for s in (1, 2, 3)
    }
    for index, row in enumerate(rows):
        length = int(batch.attention_mask[index].sum())
        if row.slot == 0:
            with torch.no_grad():
                alone = (
                    models.tiny_model(seed=0, tokenizer=tokenizer)
                    .model(input_ids=batch.input_ids[index, -length:][None])
                    .logits[0]
                )
        else:
            alone = _peft_logits(tokenizer, folders[row.slot], row.prompt, row.target)
        torch.testing.assert_close(mixed[index, -length:], alone, atol=1e-4, rtol=0)


def test_bottleneck_mixed_batch_rows_equal_rows_alone(make_engine):
    engine = make_engine("bottleneck")
    personalize(engine, [1, 2, 3])
    rows = [Row(p, t, s) for (p, t), s in zip(PROMPTS, [1, 2, 0, 3], strict=True)]
    batch = engine.encode(rows)
    with torch.no_grad():
        mixed = engine.logits(batch)
        for index, row in enumerate(rows):
            alone = engine.logits(engine.encode([row]))[0]
            torch.testing.assert_close(mixed[index, -alone.shape[0] :], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", list(SPECS))
def test_modules_change_outputs_and_slot_zero_is_the_base(kind, make_engine, tokenizer):
    engine = make_engine(kind)
    personalize(engine, [1])
    plain = models.tiny_model(seed=0, tokenizer=tokenizer).model
    prompt, target = PROMPTS[0]
    with torch.no_grad():
        base_row = engine.logits(engine.encode([Row(prompt, target, 0)]))[0]
        user_row = engine.logits(engine.encode([Row(prompt, target, 1)]))[0]
        reference = plain(input_ids=engine.encode([Row(prompt, target, 0)]).input_ids).logits[0]
    torch.testing.assert_close(base_row, reference, atol=1e-5, rtol=0)
    assert (user_row - base_row).abs().max() > 1e-3


@pytest.mark.parametrize("kind", list(SPECS))
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


@pytest.mark.parametrize("kind", list(SPECS))
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


def test_bad_slots_and_specs_are_named_errors(make_engine, tokenizer):
    engine = make_engine("lora", slots=3)
    with pytest.raises(EngineError, match="slot 3 is out of range"):
        engine.encode([Row("x", "y", 3)])
    with pytest.raises(EngineError, match="already carries slot layers"):
        type(engine)(engine.base, SPECS["lora"])
    from tailorlm.engine.engine import Engine
    from tailorlm.kinds.lora import LoraSpec

    with pytest.raises(ModuleSpecError, match="no linear projection named"):
        Engine(models.tiny_model(tokenizer=tokenizer), LoraSpec(targets=("query",)))


@pytest.mark.parametrize("kind", list(SPECS))
def test_score_choices_equals_scoring_each_choice_as_a_row(kind, make_engine):
    engine = make_engine(kind)
    personalize(engine, [1, 2])
    prompts = [p for p, _ in PROMPTS]
    slots = [1, 0, 2, 1]
    choices = ["yes", "no", "perhaps not", "a much longer answer"]
    shared = engine.score_choices(prompts, slots, choices, batch_size=3)
    for i, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
        alone = engine.score([Row(prompt, choice, slot) for choice in choices])
        assert shared[i] == pytest.approx(alone, abs=1e-4)
