"""Export for GPU servers: each exported folder passes every vLLM/LoRAX rule, stock PEFT loads it and gives
tailorlm's logits, the printed command names every user, and kinds those servers cannot load are refused."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from kind_helpers import PROMPTS, SPECS
from tailorlm import models
from tailorlm.cli import app
from tailorlm.engine.batch import Row
from tailorlm.engine.engine import Engine
from tailorlm.store import module_folder
from tailorlm.store.store import ModuleStore
from tailorlm.users.errors import UserError
from tailorlm.users.export import check_folder, commands, export_users


def fresh(tiny: models.BaseModel) -> models.BaseModel:
    return models.BaseModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.name, None)


@pytest.fixture
def store(tmp_path, tiny):
    modules = ModuleStore(tmp_path / "store")
    for index, (user, kind) in enumerate([("ann", "lora"), ("bob", "lora"), ("cid", "ia3")]):
        engine = Engine(fresh(tiny), SPECS[kind], slots=2)
        generator = torch.Generator().manual_seed(index)
        engine.bank.reset(1, generator)
        module = {
            n: t + 0.1 * torch.randn(t.shape, generator=generator) for n, t in engine.bank.read(1).items()
        }
        modules.put(user, SPECS[kind], module, model=tiny.model, base_name=models.TINY_MODEL)
    yield modules
    modules.close()


def test_exported_folders_follow_the_rules_and_load_in_stock_peft(store, tiny, tmp_path):
    from peft import PeftModel

    exported = export_users(store, ["ann", "bob"], tmp_path / "out", served="my-org/tiny")
    assert [e.user_id for e in exported] == ["ann", "bob"] and all(e.rank == 8 for e in exported)
    rows = [Row(prompt, target, 1) for prompt, target in PROMPTS]
    for item in exported:
        check_folder(item.folder, "my-org/tiny")
        config = json.loads((item.folder / module_folder.PEFT_CONFIG_FILE).read_text())
        assert config["base_model_name_or_path"] == "my-org/tiny" and config["peft_type"] == "LORA"
        engine = Engine(fresh(tiny), SPECS["lora"], slots=2)
        engine.bank.write(1, ModuleStore(store.root).get(item.user_id).tensors)
        batch = engine.encode(rows)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = engine.logits(batch)
            peft_model = PeftModel.from_pretrained(fresh(tiny).model, str(item.folder)).eval()
            theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mask = batch.attention_mask.bool()
        torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-4, rtol=1e-4)
    command = commands(exported, "my-org/tiny")["vllm"]
    assert command.startswith("vllm serve my-org/tiny --enable-lora --max-lora-rank 8")
    assert (
        f"ann={exported[0].folder.resolve()}" in command and f"bob={exported[1].folder.resolve()}" in command
    )


def test_other_kinds_are_refused_before_anything_is_written(store, tmp_path):
    with pytest.raises(UserError, match="vLLM and LoRAX load LoRA only"):
        export_users(store, ["ann", "cid"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="has no module"):
        export_users(store, ["nobody"], tmp_path / "out")


def test_a_broken_folder_fails_the_rules(store, tmp_path):
    exported = export_users(store, ["ann"], tmp_path / "out", served="x")[0]
    config_path = exported.folder / module_folder.PEFT_CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "r": 12, "target_modules": ["lm_head"], "use_dora": True}))
    with pytest.raises(UserError) as error:
        check_folder(exported.folder, "y")
    message = str(error.value)
    for part in ("rank 12", "lm_head", "DoRA", "not 'y'", "not rank 12"):
        assert part in message


def test_the_command_line(store, tmp_path):
    result = CliRunner().invoke(
        app, ["export", "ann", "--store", str(store.root), "--out", str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["served_name"] == models.TINY_MODEL and payload["command"].startswith("vllm serve tiny")
    refused = CliRunner().invoke(
        app, ["export", "cid", "--store", str(store.root), "--out", str(tmp_path / "o2")]
    )
    assert refused.exit_code == 2 and "LoRA only" in refused.output and "Traceback" not in refused.output
