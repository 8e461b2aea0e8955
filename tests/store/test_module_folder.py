"""One module folder: what it records, how much it weighs, that it is replaced whole, and named errors
for folders that are not modules or do not fit. (That every kind's folder reloads exactly and, where PEFT
has the kind, is a PEFT folder both ways is the kinds' contract: tests/kinds/test_contract.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from kind_helpers import load_into, personalize
from tailorlm import kinds
from tailorlm.store import module_folder


def test_the_folder_records_spec_base_dtype_and_meta(make_engine, tmp_path):
    engine = make_engine("lora")
    personalize(engine, [1])
    folder = module_folder.save_module(engine, 1, tmp_path / "m", meta={"user": "ann", "epochs_run": 2})
    meta = json.loads((folder / module_folder.META_FILE).read_text())
    assert meta == {
        "format_version": module_folder.FORMAT_VERSION,
        "spec": kinds.spec_to_dict(engine.spec),
        "base_model": engine.base.name,
        "dtype": "float16",
        "user": "ann",
        "epochs_run": 2,
    }


def test_fp16_at_rest_halves_the_bytes(make_engine, tmp_path):
    engine = make_engine("lora")
    personalize(engine, [1])
    half = module_folder.module_bytes(module_folder.save_module(engine, 1, tmp_path / "h"))
    full = module_folder.module_bytes(module_folder.save_module(engine, 1, tmp_path / "f", dtype="float32"))
    numbers = engine.bank.parameter_count()
    assert half < full and half < numbers * 2 + 8192


def test_a_failed_write_leaves_the_old_module_whole(make_engine, tmp_path, monkeypatch):
    engine = make_engine("lora")
    personalize(engine, [1, 2])
    folder = module_folder.save_module(engine, 1, tmp_path / "m", dtype="float32")
    first = module_folder.read_module(folder).tensors

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module_folder, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        module_folder.save_module(engine, 2, folder, dtype="float32")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left behind
    for name, value in module_folder.read_module(folder).tensors.items():
        assert torch.equal(value, first[name])
    module_folder.save_module(engine, 2, folder, dtype="float32")  # a write that succeeds replaces it
    for name, value in module_folder.read_module(folder).tensors.items():
        assert torch.equal(value, engine.bank.read(2)[name])


def test_wrong_module_files_are_named_errors(make_engine, tmp_path):
    engine = make_engine("lora")
    with pytest.raises(module_folder.ModuleFileError, match=r"adapter_model\.safetensors is missing"):
        load_into(engine, 1, tmp_path)
    ia3 = make_engine("ia3")
    ia3.bank.reset(1, torch.Generator())
    folder = module_folder.save_module(ia3, 1, tmp_path / "ia3")
    with pytest.raises(module_folder.ModuleFileError, match="this bank holds"):
        load_into(engine, 1, folder)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / module_folder.WEIGHTS_FILE).write_bytes(b"not safetensors")
    (broken / module_folder.META_FILE).write_text(json.dumps({"spec": {"kind": "lora"}}))
    with pytest.raises(module_folder.ModuleFileError, match="not a readable safetensors"):
        module_folder.read_module(broken)
    (broken / module_folder.META_FILE).write_text(json.dumps({"spec": {"kind": "lora", "rank": 0}}))
    with pytest.raises(module_folder.ModuleFileError, match="unreadable module config"):
        module_folder.read_module(broken)
    (broken / module_folder.META_FILE).unlink()
    with pytest.raises(module_folder.ModuleFileError, match="its kind is unknown"):
        module_folder.read_module(broken)
    (broken / module_folder.PEFT_CONFIG_FILE).write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(module_folder.ModuleFileError, match="'LOHA' is not one tailorlm can load"):
        module_folder.read_module(broken)
    with pytest.raises(module_folder.ModuleFileError, match="unknown storage dtype"):
        module_folder.save_module(engine, 1, tmp_path / "x", dtype="int3")


@pytest.mark.parametrize(
    "value, dtype",
    [(float("nan"), "float32"), (float("-inf"), "float32"), (7e4, "float16"), (3.4e38, "bfloat16")],
    ids=["nan", "inf", "beyond-fp16", "beyond-bf16"],
)
def test_a_module_with_nan_or_inf_is_never_written(make_engine, tmp_path, value, dtype):
    # 7e4 is a number a diverged training reaches and fp16 (max 65504) stores as inf; float32's largest
    # numbers round to inf in bf16 (max 3.39e38): the check is made after the cast.
    engine = make_engine("lora")
    personalize(engine, [1])
    tensors = engine.bank.read(1)
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[3] = value
    stored = module_folder.StoredModule(engine.spec, tensors)
    with pytest.raises(module_folder.NonFiniteModuleError, match=f"tensor {name} holds NaN or infinite"):
        module_folder.write_module(stored, tmp_path / "m", model=engine.model, dtype=dtype)
    assert not (tmp_path / "m").exists()
    if dtype == "float16":  # the same numbers fit float32
        module_folder.write_module(stored, tmp_path / "m", model=engine.model, dtype="float32")
        assert module_folder.read_module(tmp_path / "m").tensors[name].view(-1)[3] == value


def test_a_file_holding_nan_is_refused_when_read(make_engine, tmp_path):
    from safetensors.torch import load_file, save_file

    engine = make_engine("ia3")
    personalize(engine, [1])
    folder = module_folder.save_module(engine, 1, tmp_path / "m")
    weights = folder / module_folder.WEIGHTS_FILE
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))  # a damaged or foreign file: nothing of tailorlm wrote it
    with pytest.raises(module_folder.NonFiniteModuleError, match=f"{name} holds NaN"):
        module_folder.read_module(folder)
