"""Facts of the bottleneck adapter alone: PEFT has no such kind, so its folder carries tailorlm's own
keys, as its file documents, and its placement decides which projections it adapts."""

from __future__ import annotations

import copy
import json

from kind_helpers import personalize
from tailorlm import kinds
from tailorlm.engine.bank import SlotBank, SlotRouter
from tailorlm.kinds.bottleneck import BottleneckSpec
from tailorlm.store import module_folder


def test_bottleneck_folder_has_the_documented_keys_and_no_peft_config(make_engine, tmp_path):
    engine = make_engine("bottleneck")
    personalize(engine, [1])
    folder = module_folder.save_module(engine, 1, tmp_path / "b", dtype="float32")
    meta = json.loads((folder / module_folder.META_FILE).read_text())
    assert meta["spec"]["kind"] == "bottleneck" and not (folder / module_folder.PEFT_CONFIG_FILE).exists()
    stored = module_folder.read_module(folder)
    assert any(k.endswith("mlp.down_proj.adapter_up.weight") for k in stored.tensors)
    hidden = engine.model.config.hidden_size
    width = hidden // engine.spec.reduction_factor
    shapes = {
        "adapter_down.weight": (width, hidden),
        "adapter_down.bias": (width,),
        "adapter_up.weight": (hidden, width),
        "adapter_up.bias": (hidden,),
    }
    layers = engine.model.config.num_hidden_layers
    expected = {
        f"model.layers.{layer}.{block}.{suffix}": shape
        for layer in range(layers)
        for block in ("self_attn.o_proj", "mlp.down_proj")  # houlsby, the default: both sublayers
        for suffix, shape in shapes.items()
    }
    assert {name: tuple(t.shape) for name, t in stored.tensors.items()} == expected


def test_pfeiffer_adapts_the_feed_forward_output_only(tiny):
    spec = kinds.validate(BottleneckSpec(placement="pfeiffer", reduction_factor=8))
    bank = SlotBank(copy.deepcopy(tiny.model), spec, 2, SlotRouter())
    assert {layer.short_name for layer in bank.layers} == {"down_proj"}
    hidden = tiny.model.config.hidden_size
    assert {t.shape[1] for n, t in bank.tensors.items() if n.endswith("adapter_down.weight")} == {hidden // 8}
