"""Export for llama.cpp (``--format gguf``): each adapter file, read back with gguf's own reader, holds the
keys and tensor names llama.cpp's convert_lora_to_gguf.py writes, the module's alpha and A, and B with q
and k rows in the base GGUF's order; on the real base, base GGUF + adapter is tailorlm's adapted weight."""

from __future__ import annotations

import filecmp
import json
import shlex

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kind_helpers import SPECS
from tailorlm import models
from tailorlm.engine.engine import Engine
from tailorlm.kinds.lora import LoraSpec
from tailorlm.store import module_folder
from tailorlm.users.errors import UserError
from tailorlm.users.export import MANIFEST_FILE, commands, export_users, llama_permute
from tailorlm.users.service import UserService

ALL_TARGETS = LoraSpec(rank=4, alpha=8.0, targets=("k_proj", "o_proj", "q_proj", "v_proj"))
FULL = LoraSpec(
    rank=12, alpha=24.0, targets=("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj")
)
# llama.cpp's names for a llama model's projections (llama.cpp's gguf-py, constants.py: LLM_TENSOR_NAMES).
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}


def random_module(base: models.BaseModel, spec, seed: int) -> dict[str, torch.Tensor]:
    engine = Engine(base, spec, slots=2)
    generator = torch.Generator().manual_seed(seed)
    engine.bank.reset(1, generator)
    return {n: t + 0.1 * torch.randn(t.shape, generator=generator) for n, t in engine.bank.read(1).items()}


def add_users(service: UserService, make_base, users: dict[str, LoraSpec]) -> None:
    for seed, (user, spec) in enumerate(users.items()):
        base = make_base()
        service.store.put(user, spec, random_module(base, spec, seed), model=base.model, base_name=None)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def check_adapter_file(path, stored: module_folder.StoredModule, config) -> None:
    """``path`` holds ``stored`` as llama.cpp loads it, read back by gguf's reader."""
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == pytest.approx(stored.spec.alpha)
    tensors = {t.name: t for t in reader.tensors}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    expected = set()
    for layer in range(config.num_hidden_layers):
        for proj in stored.spec.targets:
            site = f"base_model.model.model.layers.{layer}.{BLOCKS.get(proj, 'mlp')}.{proj}"
            name = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
            expected |= {f"{name}.lora_a", f"{name}.lora_b"}
            a, b = (
                stored.tensors[f"{site}.lora_A.weight"].float(),
                stored.tensors[f"{site}.lora_B.weight"].float(),
            )
            if proj in ("q_proj", "k_proj"):
                b = llama_permute(b, heads, kv_heads if proj == "k_proj" else None)
            got_a, got_b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
            assert got_a.tensor_type == gguf.GGMLQuantizationType.F32
            # llama.cpp's loader: a.ne[0] is the projection's in-features, b.ne[1] its out-features, and
            # a.ne[1] == b.ne[0] is the rank.
            assert list(got_a.shape) == [a.shape[1], a.shape[0]] and list(got_b.shape) == [
                b.shape[1],
                b.shape[0],
            ]
            np.testing.assert_array_equal(np.asarray(got_a.data), a.numpy())
            np.testing.assert_array_equal(np.asarray(got_b.data), b.numpy())
    assert set(tensors) == expected


def test_gguf_adapters_hold_what_llama_cpp_reads(tmp_path, make_base, tiny):
    base = make_base()
    task = module_folder.StoredModule(SPECS["lora"], random_module(base, SPECS["lora"], 7))
    module_folder.write_module(task, tmp_path / "task", model=base.model, base_name=models.TINY_MODEL)
    service = UserService(tmp_path / "store", load_base=make_base)
    service.configure(base_model=models.TINY_MODEL, task_adapter=tmp_path / "task")
    add_users(service, make_base, {"ann": ALL_TARGETS, "a b": FULL})
    out = tmp_path / "out"
    exported = export_users(service, ["ann", "a b"], out, served="/models/tiny.gguf", format="gguf")
    assert exported.base == "/models/tiny.gguf" and not (out / "base.gguf").exists()
    check_adapter_file(
        out / "task-adapter.gguf", module_folder.read_module(tmp_path / "task"), tiny.model.config
    )
    for item in exported.users:
        assert item.path.suffix == ".gguf"
        check_adapter_file(item.path, service.store.get(item.user_id), tiny.model.config)
    saved = json.loads((out / MANIFEST_FILE).read_text())
    assert [(u["user"], u["lora_id"]) for u in saved["users"]] == [("ann", 1), ("a b", 2)]
    argv = shlex.split(commands(exported)["serve"])
    assert argv[:5] == ["llama-server", "-m", "/models/tiny.gguf", "--port", "8000"]
    loras = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--lora"]
    assert loras == [str((out / "task-adapter.gguf").resolve())] + [
        str(e.path.resolve()) for e in exported.users
    ]
    body = json.loads(shlex.split(commands(exported)["request"])[-1])
    assert body["lora"] == [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 1.0}]
    service.close()


def test_an_ia3_task_adapter_or_a_base_without_gguf_is_refused_and_nothing_is_written(tmp_path, make_base):
    base = make_base()
    task = module_folder.StoredModule(SPECS["ia3"], random_module(base, SPECS["ia3"], 7))
    module_folder.write_module(task, tmp_path / "task", model=base.model, base_name=models.TINY_MODEL)
    service = UserService(tmp_path / "store", load_base=make_base)
    service.configure(base_model=models.TINY_MODEL, task_adapter=tmp_path / "task")
    add_users(service, make_base, {"ann": SPECS["lora"]})
    with pytest.raises(UserError, match=r"task adapter is ia3; llama\.cpp applies LoRA adapters only"):
        export_users(service, ["ann"], tmp_path / "out", served="/models/tiny.gguf", format="gguf")
    with pytest.raises(UserError, match=r"base model \(tiny\) is not a GGUF file"):
        export_users(service, ["ann"], tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()
    service.close()


@pytest.mark.real_model
def test_the_real_base_gguf_plus_the_adapter_is_tailorlms_adapted_weight(tmp_path, real_base):
    """What llama.cpp computes for an adapted projection, W_gguf + alpha / r * lora_b @ lora_a, read from
    the exported files, is tailorlm's W + alpha / r * B A in the GGUF's row order."""
    spec = LoraSpec(rank=8, alpha=16.0, targets=("k_proj", "q_proj", "v_proj"))
    service = UserService(tmp_path / "store")
    base = models.load_base()
    service.store.put("ann", spec, random_module(base, spec, 1), model=base.model, base_name=None)
    del base
    out = tmp_path / "out"
    export_users(service, ["ann"], out, format="gguf")
    assert filecmp.cmp(out / "base.gguf", models.gguf_path(), shallow=False)
    stored = service.store.get("ann")
    config = real_base.model.config
    hf = load_file(str(models.ensure_default_cached() / "model.safetensors"))
    base_tensors = {t.name: t for t in gguf.GGUFReader(str(out / "base.gguf")).tensors}
    adapter = {
        t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out / "adapters" / "ann.gguf")).tensors
    }
    for layer, proj in [(0, "q_proj"), (0, "k_proj"), (29, "v_proj")]:
        site = f"model.layers.{layer}.self_attn.{proj}"
        name = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
        quantized = base_tensors[name]
        served = torch.from_numpy(gguf.quants.dequantize(quantized.data, quantized.tensor_type).copy())
        served += spec.scale * torch.from_numpy(adapter[f"{name}.lora_b"] @ adapter[f"{name}.lora_a"])
        a = stored.tensors[f"base_model.model.{site}.lora_A.weight"]
        b = stored.tensors[f"base_model.model.{site}.lora_B.weight"]
        ours = hf[f"{site}.weight"] + spec.scale * (b.float() @ a.float())
        if proj != "v_proj":
            ours = llama_permute(
                ours, config.num_attention_heads, config.num_key_value_heads if proj == "k_proj" else None
            )
        torch.testing.assert_close(served, ours, atol=1e-5, rtol=1e-5)
    service.close()


def test_the_command_line_exports_gguf(tmp_path, make_base):
    from typer.testing import CliRunner

    from tailorlm.cli import app

    service = UserService(tmp_path / "store", load_base=make_base)
    service.configure(base_model=models.TINY_MODEL)
    add_users(service, make_base, {"ann": SPECS["lora"]})
    root, out = str(service.root), str(tmp_path / "out")
    refused = CliRunner().invoke(app, ["export", "ann", "--format", "gguf", "--store", root, "--out", out])
    assert (
        refused.exit_code == 2 and "not a GGUF file" in refused.output and "Traceback" not in refused.output
    )
    result = CliRunner().invoke(
        app,
        ["export", "ann", "--format", "gguf", "--served-name", "/m/t.gguf", "--store", root, "--out", out],
    )
    assert result.exit_code == 0, result.output
    assert "llama-server -m /m/t.gguf --port 8000 --lora-init-without-apply --lora" in result.stdout
    assert '"lora": [{"id": 0, "scale": 1.0}]' in result.stdout
    service.close()
