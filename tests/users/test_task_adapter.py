"""OPPU's task adapter: recorded in the store, merged into the base for training and serving alike."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch

from kind_helpers import SPECS
from tailorlm import kinds, models
from tailorlm.engine.engine import Engine
from tailorlm.engine.generation import DecodeConfig
from tailorlm.serve.config import ServeConfig
from tailorlm.serve.run import background, free_port
from tailorlm.store import module_folder
from tailorlm.store.module_folder import StoredModule
from tailorlm.store.store import ModuleStore
from tailorlm.users.errors import UserError
from tailorlm.users.service import TASK_ADAPTER_FOLDER, UserService


def fresh(tiny: models.BaseModel) -> models.BaseModel:
    return models.BaseModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.name, None)


def random_module(tiny, kind: str, seed: int) -> dict[str, torch.Tensor]:
    engine = Engine(fresh(tiny), SPECS[kind], slots=2)
    generator = torch.Generator().manual_seed(seed)
    engine.bank.reset(1, generator)
    return {n: t + 0.2 * torch.randn(t.shape, generator=generator) for n, t in engine.bank.read(1).items()}


@pytest.fixture
def adapter_folder(tmp_path, tiny):
    folder = tmp_path / "adapter"
    stored = StoredModule(SPECS["lora"], random_module(tiny, "lora", seed=5), {})
    module_folder.write_module(stored, folder, model=tiny.model, dtype="float32")
    return folder


def q_weight(base: models.BaseModel) -> torch.Tensor:
    return base.model.model.layers[0].self_attn.q_proj.weight.detach().clone()


def test_the_adapter_is_kept_in_the_store_and_merged(tmp_path, tiny, adapter_folder):
    service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", task_adapter=adapter_folder)
    assert service.settings().task_adapter == TASK_ADAPTER_FOLDER
    assert (tmp_path / "store" / TASK_ADAPTER_FOLDER / module_folder.WEIGHTS_FILE).is_file()
    for item in adapter_folder.iterdir():  # the store no longer depends on the original folder
        item.unlink()
    merged = service.load_base()()
    assert not torch.equal(q_weight(merged), q_weight(tiny))
    expected = fresh(tiny)
    stored = module_folder.read_module(tmp_path / "store" / TASK_ADAPTER_FOLDER)
    kinds.of(stored.spec).merge_into_base(stored.spec, expected.model, stored.tensors)
    assert torch.equal(q_weight(merged), q_weight(expected))
    service.close()


def test_refused_adapters(tmp_path, tiny, adapter_folder):
    service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny))
    with pytest.raises(UserError, match="not a module folder"):
        service.configure(task_adapter=tmp_path / "nowhere")
    prompt_folder = tmp_path / "prompt"
    module_folder.write_module(
        StoredModule(SPECS["prompt"], random_module(tiny, "prompt", 1), {}), prompt_folder, model=tiny.model
    )
    with pytest.raises(UserError, match="cannot be merged"):
        service.configure(task_adapter=prompt_folder)
    service.add("u1", "lora")
    service.store.put(
        "u1", SPECS["lora"], random_module(tiny, "lora", 2), model=tiny.model, base_name=tiny.name
    )
    with pytest.raises(UserError, match="new store"):
        service.configure(task_adapter=adapter_folder)
    service.close()


def test_users_are_served_on_the_merged_base(tmp_path, tiny, adapter_folder):
    root = tmp_path / "store"
    service = UserService(root, load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", task_adapter=adapter_folder)
    service.add("u1", "ia3")
    module = random_module(tiny, "ia3", 3)
    service.store.put("u1", SPECS["ia3"], module, model=tiny.model, base_name=tiny.name)
    key = service.issue_key("u1")
    expected_engine = Engine(service.load_base()(), SPECS["ia3"], slots=2)
    expected_engine.bank.write(1, module)
    expected = expected_engine.generate(["Tell me"], [1], DecodeConfig(max_new_tokens=6))[0]
    service.close()
    with background(ServeConfig(store=root, port=free_port(), retrain=False), base=fresh(tiny)) as server:
        answer = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "u1", "prompt": "Tell me", "max_tokens": 6, "temperature": 0},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ).json()
    assert answer["choices"][0]["text"].strip() == expected


def test_a_bench_runs_task_adapter_store_is_taken_as_its_one_module(tmp_path, tiny, adapter_folder):
    """``--task-adapter RUN/modules/task-adapter-plain``: the run's store of the one task adapter gives
    its current version; a store of two modules is refused, naming the folder."""
    run_store = ModuleStore(tmp_path / "task-adapter-plain")
    module = random_module(tiny, "lora", seed=5)
    run_store.put("task", SPECS["lora"], module, model=tiny.model, base_name=tiny.name)
    stored = run_store.get("task").tensors  # as the store keeps it (its storage dtype)
    run_store.close()
    service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny))
    service.configure(task="verbagg", task_adapter=tmp_path / "task-adapter-plain")
    kept = module_folder.read_module(tmp_path / "store" / TASK_ADAPTER_FOLDER)
    assert set(kept.tensors) == set(stored)
    assert all(torch.equal(kept.tensors[name], stored[name]) for name in stored)
    service.close()
    two = ModuleStore(tmp_path / "two")
    for user in ("a", "b"):
        two.put(user, SPECS["lora"], module, model=tiny.model, base_name=tiny.name)
    two.close()
    other = UserService(tmp_path / "other", load_base=lambda: fresh(tiny))
    with pytest.raises(UserError, match="module store of 2 modules"):
        other.configure(task_adapter=tmp_path / "two")
    other.close()
