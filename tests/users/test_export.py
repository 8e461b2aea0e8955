"""Export for GPU servers: the exported base is the one tailorlm trains over (task adapter merged), stock
PEFT loads base + adapter with the engine's logits, ranks map onto vLLM's --max-lora-rank, a refused export
writes nothing, and the printed commands parse as vLLM parses them, whatever the user ids and paths."""

from __future__ import annotations

import json
import shlex
import warnings
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kind_helpers import PROMPTS, SPECS
from tailorlm import models
from tailorlm.cli import app
from tailorlm.engine.batch import Row
from tailorlm.engine.engine import Engine
from tailorlm.kinds.lora import LoraSpec
from tailorlm.store import module_folder
from tailorlm.users.errors import UserError
from tailorlm.users.export import (
    MANIFEST_FILE,
    VLLM_RANKS,
    base_shapes,
    check_folder,
    commands,
    export_users,
    max_lora_rank,
    served_name,
)
from tailorlm.users.service import UserService

TOLERANCE = 2e-4  # stock PEFT over the exported base against the engine, max |logit difference|


def random_module(base: models.BaseModel, spec, seed: int) -> dict[str, torch.Tensor]:
    engine = Engine(base, spec, slots=2)
    generator = torch.Generator().manual_seed(seed)
    engine.bank.reset(1, generator)
    return {n: t + 0.1 * torch.randn(t.shape, generator=generator) for n, t in engine.bank.read(1).items()}


def add_users(service: UserService, make_base, users: dict[str, object]) -> None:
    for seed, (user, spec) in enumerate(users.items()):
        base = make_base()
        service.store.put(
            user, spec, random_module(base, spec, seed), model=base.model, base_name=models.TINY_MODEL
        )


@pytest.fixture
def service(tmp_path, make_base):
    """A store whose base is the tiny model (so the CLI, which loads it by name, gets the same weights)."""
    users = UserService(tmp_path / "store", load_base=make_base)
    users.configure(base_model=models.TINY_MODEL)
    add_users(users, make_base, {"ann": SPECS["lora"], "bob": SPECS["lora"], "cid": SPECS["ia3"]})
    yield users
    users.close()


def vllm_lora_modules(command: str) -> dict[str, str]:
    """``--lora-modules`` of a printed vLLM command, read the way vLLM's LoRAParserAction reads it
    (vllm/entrypoints/openai/cli_args.py): ``name=path`` when the value has one "=" and no ",", else JSON."""
    argv = shlex.split(command)
    values = argv[argv.index("--lora-modules") + 1 :]
    modules = {}
    for item in values:
        if "=" in item and "," not in item:
            name, path = item.split("=")  # more than one "=" raises, as in vLLM
        else:
            parsed = json.loads(item)
            name, path = parsed["name"], parsed["path"]
        modules[name] = path
    return modules


def engine_and_peft_logits(service: UserService, user_id: str, folder) -> float:
    """Max |logit difference| between the engine (over the service's base, as tailorlm serves) and stock
    PEFT loading the exported adapter folder, which loads the base its config names."""
    from peft import AutoPeftModelForCausalLM

    stored = service.store.get(user_id)
    engine = Engine(service.load_base()(), stored.spec, slots=2)
    engine.bank.write(1, stored.tensors)
    batch = engine.encode([Row(prompt, target, 1) for prompt, target in PROMPTS])
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = engine.logits(batch)
        peft_model = AutoPeftModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.attention_mask.bool()
    return float((ours[mask] - theirs[mask]).abs().max())


def test_stock_peft_loads_the_exported_base_and_adapters_with_the_engines_logits(service, tmp_path):
    out = tmp_path / "out"
    exported = export_users(service, ["ann", "bob"], out)
    assert exported.base == str((out / "base").resolve()) and (out / "base" / "model.safetensors").is_file()
    assert [e.user_id for e in exported.users] == ["ann", "bob"] and exported.max_lora_rank == 8
    shapes = base_shapes(service.load_base()().model.config)
    for item in exported.users:
        check_folder(item.path, exported.base, shapes)
        assert engine_and_peft_logits(service, item.user_id, item.path) <= TOLERANCE
    command = commands(exported)["serve"]
    assert shlex.split(command)[:3] == ["vllm", "serve", exported.base]
    assert "--max-lora-rank 8" in command and " --dtype float32 " in command
    assert vllm_lora_modules(command) == {e.name: str(e.path.resolve()) for e in exported.users}
    saved = json.loads((out / MANIFEST_FILE).read_text())
    assert [(u["user"], u["served_name"], u["path"]) for u in saved["users"]] == [
        ("ann", "ann", "adapters/ann"),
        ("bob", "bob", "adapters/bob"),
    ]


def test_the_base_of_an_oppu_store_has_its_task_adapter_merged(tmp_path, make_base):
    """The modules of a store with a task adapter were trained over base + task adapter: that merged base
    is what is exported, and stock PEFT over it gives the engine's logits."""
    base = make_base()
    task_adapter = module_folder.StoredModule(SPECS["lora"], random_module(base, SPECS["lora"], 7))
    module_folder.write_module(task_adapter, tmp_path / "task", model=base.model, base_name=models.TINY_MODEL)
    service = UserService(tmp_path / "store", load_base=make_base)
    service.configure(base_model=models.TINY_MODEL, task_adapter=tmp_path / "task")
    add_users(service, make_base, {"ann": SPECS["lora"]})
    exported = export_users(service, ["ann"], tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "base" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    merged = service.load_base()().model.state_dict()[key]
    assert torch.equal(saved[key], merged) and not torch.equal(
        saved[key], make_base().model.state_dict()[key]
    )
    assert engine_and_peft_logits(service, "ann", exported.users[0].path) <= TOLERANCE
    service.close()


def test_base_shapes_are_the_models_own(tiny):
    shapes = base_shapes(tiny.model.config)
    assert shapes["layers"] == len(tiny.model.model.layers) == 2
    for name, linear in tiny.model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(linear, torch.nn.Linear) and short in shapes:
            assert shapes[short] == (linear.out_features, linear.in_features), name


def test_ranks_below_a_vllm_choice_load_under_the_next_one(service, tmp_path, make_base):
    add_users(service, make_base, {"r4": LoraSpec(rank=4), "r12": LoraSpec(rank=12)})
    only_four = export_users(service, ["r4"], tmp_path / "four")
    assert only_four.max_lora_rank == 8 and "--max-lora-rank 8 " in commands(only_four)["serve"]
    both = export_users(service, ["r4", "r12", "ann"], tmp_path / "both")
    assert [e.rank for e in both.users] == [4, 12, 8] and "--max-lora-rank 16 " in commands(both)["serve"]
    assert engine_and_peft_logits(service, "r12", both.users[1].path) <= TOLERANCE
    assert [max_lora_rank(r) for r in (1, 2, 8, 9, 300, 321, 512)] == [1, 8, 8, 16, 320, 512, 512]
    with pytest.raises(UserError, match="above the largest"):
        max_lora_rank(VLLM_RANKS[-1] + 1)


def test_a_rank_above_vllms_largest_is_refused_and_nothing_is_written(service, tmp_path, make_base):
    add_users(service, make_base, {"huge": LoraSpec(rank=VLLM_RANKS[-1] + 1, targets=("v_proj",))})
    with pytest.raises(UserError, match="'huge' cannot be exported: rank 513 is not between 1 and 512"):
        export_users(service, ["ann", "huge"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_refused_export_writes_nothing_and_keeps_the_previous_one(service, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="vLLM and LoRAX load LoRA only"):
        export_users(service, ["ann", "cid"], out)
    assert not out.exists()
    with pytest.raises(UserError, match="has no module"):
        export_users(service, ["ann", "nobody"], out)
    assert not out.exists()
    export_users(service, ["ann"], out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(UserError, match="LoRA only"):
        export_users(service, ["bob", "cid"], out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    export_users(service, ["bob"], out)  # an earlier export is replaced whole
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["bob"]


def test_a_folder_of_other_files_is_never_replaced(service, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an export"):
        export_users(service, ["ann"], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


ODD_IDS = ["ann", "a b", "x=y", "p,q", "it's", "ünïcödé", "a/../b", "-rf"]


def test_odd_user_ids_and_paths_give_commands_that_parse_as_printed(service, tmp_path, make_base):
    add_users(service, make_base, {user: SPECS["lora"] for user in ODD_IDS[1:]})
    out = tmp_path / "an out=1,2 'dir'"
    exported = export_users(service, ODD_IDS, out)
    names = {e.user_id: e.name for e in exported.users}
    assert names["ann"] == "ann" and len(set(names.values())) == len(ODD_IDS)
    for name in names.values():
        assert served_name(name) == name  # every served name is one vLLM, a shell and a URL take as is
    modules = vllm_lora_modules(commands(exported)["serve"])
    assert modules == {e.name: str(e.path.resolve()) for e in exported.users}
    assert all((out / "adapters" / name).is_dir() for name in modules)
    saved = json.loads((out / MANIFEST_FILE).read_text())
    assert {u["user"]: u["served_name"] for u in saved["users"]} == names
    request = shlex.split(commands(exported)["request"])
    assert json.loads(request[-1])["model"] == "ann"
    lorax = commands(replace(exported, format="lorax"))
    argv = shlex.split(lorax["serve"])
    assert argv == ["lorax-launcher", "--model-id", exported.base, "--port", "8000"]
    request = shlex.split(lorax["request"])
    assert json.loads(request[-1])["parameters"]["adapter_id"] == str(exported.users[0].path.resolve())


def test_an_ia3_user_is_refused_with_a_hint_that_works(tmp_path, make_base):
    service = UserService(tmp_path / "store s", load_base=make_base)
    service.import_task("verbagg", users=1, kind="ia3")
    user = service.list_users()[0].user_id
    base = make_base()
    module = random_module(base, SPECS["ia3"], 0)
    fingerprint = service.data_fingerprint(user)  # up to date, so only the kind can make it stale
    service.store.put(
        user, SPECS["ia3"], module, model=base.model, base_name=None, data_fingerprint=fingerprint
    )
    assert service.needs_training(user) is None
    with pytest.raises(UserError, match="LoRA only") as error:
        export_users(service, [user], tmp_path / "out")
    hint = str(error.value).split("history kept): ", 1)[1].rsplit(" (if they came", 1)[0]
    first, second = (shlex.split(part) for part in hint.split(" && "))
    assert first[:2] == ["tailorlm", "users"] and second[:3] == ["tailorlm", "users", "train"]
    result = CliRunner().invoke(app, first[1:])
    assert result.exit_code == 0, result.output
    reread = UserService(service.root)
    assert reread.show(user).kind == "lora" and reread.needs_training(user) == "module spec changed"
    reread.close()
    service.close()


def mutate(folder, tensors=None, config=None) -> None:
    """Rewrite an exported adapter: ``tensors`` maps its tensors to new ones, ``config`` its config."""
    weights = folder / module_folder.WEIGHTS_FILE
    if tensors is not None:
        save_file(tensors(load_file(str(weights))), str(weights))
    if config is not None:
        path = folder / module_folder.PEFT_CONFIG_FILE
        path.write_text(json.dumps(config(json.loads(path.read_text()))))


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
V1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_{}.weight"


def _without(*keys):
    return lambda t: {k: v for k, v in t.items() if k not in keys}


REFUSALS = {
    "lora_A of the wrong size": (
        dict(tensors=lambda t: {**t, Q_A: t[Q_A][:, :-1].contiguous()}),
        f"tensor {Q_A} has shape [8, 63], not [8, 64]",
    ),
    "lora_B of the wrong size": (
        dict(tensors=lambda t: {**t, Q_B: torch.zeros(32, 8, dtype=t[Q_B].dtype)}),
        f"tensor {Q_B} has shape [32, 8], not [64, 8]",
    ),
    "a layer past the last": (
        dict(
            tensors=lambda t: {**t, **{k.replace("layers.1.", "layers.2."): v.clone() for k, v in t.items()}}
        ),
        "is in layer 2; the base model has 2 layers",
    ),
    "a missing lora_B": (dict(tensors=_without(Q_B)), "layer 0 q_proj has no lora_B"),
    "a projection missing from one layer": (
        dict(tensors=_without(V1.format("A"), V1.format("B"))),
        "layer 1 v_proj has no lora_A or lora_B",
    ),
    "rank_pattern": (dict(config=lambda c: {**c, "rank_pattern": {"q_proj": 4}}), "rank_pattern"),
    "alpha_pattern": (dict(config=lambda c: {**c, "alpha_pattern": {"q_proj": 4.0}}), "alpha_pattern"),
    "use_rslora": (dict(config=lambda c: {**c, "use_rslora": True}), "use_rslora: LoRAX ignores it"),
    "a projection tensor not in target_modules": (
        dict(config=lambda c: {**c, "target_modules": ["v_proj"]}),
        "adapts self_attn.q_proj, not one of the target modules",
    ),
}


@pytest.mark.parametrize("broken", list(REFUSALS))
def test_the_check_refuses(broken, service, tmp_path, tiny):
    exported = export_users(service, ["ann"], tmp_path / "out", served="my-org/tiny").users[0]
    shapes = base_shapes(tiny.model.config)
    check_folder(exported.path, "my-org/tiny", shapes)  # sound before it is broken
    change, reason = REFUSALS[broken]
    mutate(exported.path, **change)
    with pytest.raises(UserError) as error:
        check_folder(exported.path, "my-org/tiny", shapes)
    assert reason in str(error.value)


def test_the_check_names_every_config_problem(service, tmp_path, tiny):
    exported = export_users(service, ["ann"], tmp_path / "out", served="x").users[0]
    mutate(exported.path, config=lambda c: {**c, "target_modules": ["lm_head"], "use_dora": True, "r": 0})
    with pytest.raises(UserError) as error:
        check_folder(exported.path, "y", base_shapes(tiny.model.config))
    for part in ("rank 0", "lm_head", "DoRA", "not 'y'"):
        assert part in str(error.value)


def test_the_command_line(service, tmp_path):
    root = str(service.root)
    result = CliRunner().invoke(
        app, ["export", "ann", "a b", "--store", root, "--out", str(tmp_path / "o"), "--json"]
    )
    assert result.exit_code == 2 and "no module" in result.output and not (tmp_path / "o").exists()
    result = CliRunner().invoke(
        app, ["export", "ann", "--store", root, "--out", str(tmp_path / "o"), "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["base"] == str((tmp_path / "o" / "base").resolve())
    assert shlex.split(payload["command"])[:3] == ["vllm", "serve", payload["base"]]
    served = CliRunner().invoke(
        app, ["export", "bob", "--store", root, "--out", str(tmp_path / "s"), "--served-name", "my org/tiny"]
    )
    assert served.exit_code == 0, served.output
    assert (
        not (tmp_path / "s" / "base").exists() and "vllm serve 'my org/tiny' --dtype float32" in served.stdout
    )
    refused = CliRunner().invoke(app, ["export", "cid", "--store", root, "--out", str(tmp_path / "o2")])
    assert refused.exit_code == 2 and "LoRA only" in refused.output and "Traceback" not in refused.output


def test_the_command_line_names_renamed_users(service, tmp_path, make_base):
    add_users(service, make_base, {"a b": SPECS["lora"]})
    result = CliRunner().invoke(
        app,
        ["export", "a b", "--format", "lorax", "--store", str(service.root), "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 0, result.output
    assert f"user 'a b' is served as {served_name('a b')}" in result.stdout
    assert (
        "lorax-launcher --model-id" in result.stdout
        and "curl http://127.0.0.1:8000/generate" in result.stdout
    )


@pytest.mark.real_model
def test_the_real_base_exported_with_a_task_adapter_gives_the_engines_logits(tmp_path, real_base):
    """The default base (the GGUF file's weights, dequantized) with an OPPU task adapter merged: the
    exported folder is that base, and stock PEFT over it matches the engine."""
    spec = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    task_adapter = module_folder.StoredModule(spec, random_module(models.load_base(), spec, 7))
    module_folder.write_module(task_adapter, tmp_path / "task", model=real_base.model, base_name=None)
    service = UserService(tmp_path / "store")
    service.configure(task_adapter=tmp_path / "task")
    base = models.load_base()
    service.store.put("ann", spec, random_module(base, spec, 1), model=base.model, base_name=None)
    del base
    shapes = base_shapes(real_base.model.config)
    for name, linear in real_base.model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(linear, torch.nn.Linear) and short in shapes:
            assert shapes[short] == (linear.out_features, linear.in_features), name
    exported = export_users(service, ["ann"], tmp_path / "out")
    difference = engine_and_peft_logits(service, "ann", exported.users[0].path)
    print(f"max |logit difference|, engine against stock PEFT over the exported base: {difference:.2e}")
    assert difference <= TOLERANCE
    service.close()


def test_a_base_trained_in_bf16_is_written_and_served_in_bf16(service, tmp_path, make_base):
    """``--dtype auto`` may train a store's users on a bf16 base: the export writes that base as it is and
    tells vLLM its dtype, not fp32 (an fp32 export still says float32: the test above)."""
    in_bf16 = UserService(service.store, load_base=lambda: make_base("bf16"))
    exported = export_users(in_bf16, ["ann"], tmp_path / "out")
    assert exported.dtype == "bfloat16" and " --dtype bfloat16 " in commands(exported)["serve"]
    written = json.loads((tmp_path / "out" / "base" / "config.json").read_text())
    assert written.get("torch_dtype", written.get("dtype")) == "bfloat16"
