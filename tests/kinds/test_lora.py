"""Facts of the LoRA kind alone: its merge is PEFT's, its dropout does not change the layout, and the
tensor names other tools write are mapped to the bank's."""

from __future__ import annotations

import torch
from peft import PeftModel

from kind_helpers import PROMPTS, personalize
from tailorlm import kinds
from tailorlm.engine.engine import Row
from tailorlm.kinds import PEFT_PREFIX
from tailorlm.kinds.lora import Lora, LoraSpec
from tailorlm.store import module_folder


def test_merged_task_adapter_equals_peft_with_that_adapter(make_engine, make_base, tmp_path):
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
        peft_model = PeftModel.from_pretrained(make_base().model, str(folder))
        ids = merged.encode([Row(prompt, target, 0)]).input_ids
        theirs = peft_model.eval()(input_ids=ids).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_dropout_does_not_change_the_layout():
    assert kinds.same_layout(LoraSpec(dropout=0.0), LoraSpec(dropout=0.1))
    assert kinds.same_layout(LoraSpec(targets=("q_proj", "v_proj")), LoraSpec(targets=("v_proj", "q_proj")))
    assert not kinds.same_layout(LoraSpec(rank=8), LoraSpec(rank=4))
    assert not kinds.same_layout(LoraSpec(alpha=16), LoraSpec(alpha=8))


def test_adapter_names_other_tools_keep_are_dropped():
    name = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_A"
    tensor = torch.zeros(1)
    assert Lora().normalize_names({f"{name}.default.weight": tensor}) == {f"{name}.weight": tensor}
