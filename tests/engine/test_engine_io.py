"""Module files: PEFT's format for LoRA, IA3 and prompt tuning; tailorlm's for the bottleneck adapter."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import PROMPTS, SPECS, load_into, personalize
from peft import PeftModel

from tailorlm import kinds, models
from tailorlm.engine.engine import Row
from tailorlm.store import module_folder


def _batch_logits(engine, slot):
    with torch.no_grad():
        return engine.logits(engine.encode([Row(p, t, slot) for p, t in PROMPTS]))


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt"])
def test_saved_module_loads_in_stock_peft_with_the_same_outputs(kind, make_engine, tokenizer, tmp_path):
    source = make_engine(kind)
    personalize(source, [2])
    folder = module_folder.save_module(source, 2, tmp_path / "user")  # fp16 at rest, the default
    assert json.loads((folder / module_folder.PEFT_CONFIG_FILE).read_text())["peft_type"] in {
        "LORA",
        "IA3",
        "PROMPT_TUNING",
    }
    engine = make_engine(kind)
    load_into(engine, 1, folder)
    prompt, target = PROMPTS[2]
    with torch.no_grad():
        ours = engine.logits(engine.encode([Row(prompt, target, 1)]))[0]
        peft_model = PeftModel.from_pretrained(
            models.tiny_model(seed=0, tokenizer=tokenizer).model, str(folder)
        )
        ids = engine.encode([Row(prompt, target, 0)]).input_ids
        theirs = peft_model.eval()(input_ids=ids).logits[0, -ids.shape[1] :]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", list(SPECS))
def test_load_into_one_slot_leaves_the_others_untouched(kind, make_engine, tmp_path):
    engine = make_engine(kind, slots=4)
    personalize(engine, [1, 2, 3])
    folder = module_folder.save_module(engine, 3, tmp_path / "m")
    before = {s: engine.bank.read(s) for s in (1, 3)}
    load_into(engine, 2, folder)
    for slot, tensors in before.items():
        for name, value in engine.bank.read(slot).items():
            assert torch.equal(value, tensors[name])
    for name, value in engine.bank.read(2).items():
        torch.testing.assert_close(value, before[3][name], atol=1e-3, rtol=1e-3)  # fp16 round trip


def test_bottleneck_round_trip_and_documented_keys(make_engine, tmp_path):
    engine = make_engine("bottleneck")
    personalize(engine, [1])
    folder = module_folder.save_module(engine, 1, tmp_path / "b", dtype="float32")
    meta = json.loads((folder / module_folder.META_FILE).read_text())
    assert meta["spec"]["kind"] == "bottleneck" and not (folder / module_folder.PEFT_CONFIG_FILE).exists()
    stored = module_folder.read_module(folder)
    assert any(k.endswith("mlp.down_proj.adapter_up.weight") for k in stored.tensors)
    other = make_engine("bottleneck")
    load_into(other, 2, folder)
    torch.testing.assert_close(_batch_logits(engine, 1), _batch_logits(other, 2), atol=1e-6, rtol=0)


def test_fp16_at_rest_halves_the_bytes(make_engine, tmp_path):
    engine = make_engine("lora")
    personalize(engine, [1])
    half = module_folder.module_bytes(module_folder.save_module(engine, 1, tmp_path / "h"))
    full = module_folder.module_bytes(module_folder.save_module(engine, 1, tmp_path / "f", dtype="float32"))
    numbers = engine.bank.parameter_count()
    assert half < full and half < numbers * 2 + 8192


def test_wrong_module_files_are_named_errors(make_engine, tmp_path):
    engine = make_engine("lora")
    with pytest.raises(module_folder.ModuleFileError, match=r"adapter_model\.safetensors is missing"):
        load_into(engine, 1, tmp_path)
    ia3 = make_engine("ia3")
    folder = (
        module_folder.save_module(ia3, 1, tmp_path / "ia3")
        if ia3.bank.reset(1, torch.Generator()) is None
        else None
    )
    with pytest.raises(module_folder.ModuleFileError, match="this bank holds"):
        load_into(engine, 1, folder)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / module_folder.WEIGHTS_FILE).write_bytes(b"not safetensors")
    (broken / module_folder.META_FILE).write_text(json.dumps({"spec": {"kind": "lora"}}))
    with pytest.raises(module_folder.ModuleFileError, match="not a readable safetensors"):
        module_folder.read_module(broken)
    with pytest.raises(module_folder.ModuleFileError, match="unknown storage dtype"):
        module_folder.save_module(engine, 1, tmp_path / "x", dtype="int3")


def test_merged_task_adapter_equals_peft_with_that_adapter(make_engine, tokenizer, tmp_path):
    source = make_engine("lora")
    personalize(source, [1], noise=0.2)
    folder = module_folder.save_module(source, 1, tmp_path / "task", dtype="float32")
    merged = make_engine("ia3")  # personal modules of another kind build on the merged base
    stored = module_folder.read_module(folder)
    assert (
        kinds.of(stored.spec).merge_into_base(stored.spec, merged.model, stored.tensors) == 2 * 2
    )  # q, v in two layers
    prompt, target = PROMPTS[0]
    with torch.no_grad():
        ours = merged.logits(merged.encode([Row(prompt, target, 0)]))[0]
        peft_model = PeftModel.from_pretrained(
            models.tiny_model(seed=0, tokenizer=tokenizer).model, str(folder)
        )
        ids = merged.encode([Row(prompt, target, 0)]).input_ids
        theirs = peft_model.eval()(input_ids=ids).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
