"""Users' LoRA modules in the layout GPU servers load: vLLM (``--enable-lora --lora-modules``) and LoRAX
(``adapter_source: local``). A stored LoRA version is already a PEFT LoRA folder; exporting copies its
weights, sets ``base_model_name_or_path`` to the name the server serves (vLLM's resolver requires them
equal) and checks every rule those servers enforce (``../shared/research/SERVING.md``). Other kinds are
refused: neither server loads IA3, bottleneck adapters or prompt tuning.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from tailorlm import models
from tailorlm.files import atomic_folder
from tailorlm.store import module_folder
from tailorlm.store.store import ModuleStore, folder_name
from tailorlm.users.errors import UserError

FORMATS = ("vllm", "lorax")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The hub name a GPU server knows the default base model by.
SERVED_NAMES = {models.DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_KEY = re.compile(r"base_model\.model\.(?P<path>.+)\.(?P<part>lora_A|lora_B)\.weight")


@dataclass(frozen=True)
class Exported:
    user_id: str
    folder: Path
    rank: int
    targets: tuple[str, ...]
    served: str  # the base model's name on the server, as written in the folder


def served_name(base_model: str | None) -> str:
    return SERVED_NAMES.get(base_model or models.DEFAULT_MODEL, base_model or models.DEFAULT_MODEL)


def export_users(
    store: ModuleStore, user_ids: Sequence[str], out: Path, served: str | None = None
) -> list[Exported]:
    """Each user's current LoRA version as ``out/<user folder>/``; every user is checked before any is
    written, so a refused user leaves nothing half exported."""
    if not user_ids:
        raise UserError("name the users to export")
    plans = [_plan(store, user_id) for user_id in dict.fromkeys(user_ids)]
    exported = []
    for user_id, source, config in plans:
        name = served or served_name(store.current(user_id).base_model)
        config = {**config, "base_model_name_or_path": name}
        target = out / folder_name(user_id)
        with atomic_folder(target) as staging:
            shutil.copy2(source / module_folder.WEIGHTS_FILE, staging / module_folder.WEIGHTS_FILE)
            (staging / module_folder.PEFT_CONFIG_FILE).write_text(
                json.dumps(config, indent=2, sort_keys=True)
            )
        check_folder(target, name)
        exported.append(Exported(user_id, target, int(config["r"]), tuple(config["target_modules"]), name))
    return exported


def _plan(store: ModuleStore, user_id: str) -> tuple[str, Path, Mapping[str, Any]]:
    record = store.current(user_id)
    if record is None:
        raise UserError(f"user {user_id!r} has no module in {store.location}")
    if record.kind != "lora":
        raise UserError(
            f"user {user_id!r} has a {record.kind} module: vLLM and LoRAX load LoRA only (IA3 is a full-rank "
            "change of the weights, and bottleneck adapters and prompt tuning have no LoRA form); serve this "
            "user with tailorlm serve, or retrain them as LoRA (users add --kind lora)"
        )
    store.get(user_id)  # the checksum holds before anything is copied
    folder = store.folder(user_id)
    return user_id, folder, json.loads((folder / module_folder.PEFT_CONFIG_FILE).read_text())


def check_folder(folder: Path, served: str) -> None:
    """Every rule vLLM and LoRAX apply to a LoRA folder; a broken one raises ``UserError``."""
    config = json.loads((folder / module_folder.PEFT_CONFIG_FILE).read_text())
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    if config.get("r") not in VLLM_RANKS:
        problems.append(f"rank {config.get('r')} is not one vLLM accepts ({VLLM_RANKS})")
    unsupported = sorted(set(config.get("target_modules") or ()) - set(SUPPORTED_TARGETS))
    if unsupported or not config.get("target_modules"):
        problems.append(f"target modules {unsupported or 'none'} are not among {SUPPORTED_TARGETS}")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("a LoRA bias is not supported")
    if config.get("use_dora") or config.get("modules_to_save"):
        problems.append("DoRA and modules_to_save are not supported")
    if config.get("init_lora_weights") not in (True, False, "gaussian"):
        problems.append(
            f"init_lora_weights {config.get('init_lora_weights')!r} (PiSSA/LoftQ-style) is not supported"
        )
    if config.get("base_model_name_or_path") != served:
        problems.append(
            f"base_model_name_or_path is {config.get('base_model_name_or_path')!r}, not {served!r}"
        )
    problems += _weight_problems(folder / module_folder.WEIGHTS_FILE, int(config.get("r", 0)))
    if problems:
        raise UserError(f"{folder}: " + "; ".join(problems))


def _weight_problems(path: Path, rank: int) -> list[str]:
    problems = []
    with safe_open(str(path), "pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = _KEY.fullmatch(key)
            if match is None:
                problems.append(f"tensor {key!r} is not named base_model.model.<path>.lora_A/B.weight")
                continue
            shape = tuple(weights.get_slice(key).get_shape())
            axis = 0 if match["part"] == "lora_A" else 1  # lora_A [r, in], lora_B [out, r]
            if len(shape) != 2 or shape[axis] != rank:
                problems.append(f"tensor {key} has shape {shape}, not rank {rank} on axis {axis}")
    return problems


def commands(exported: Sequence[Exported], served: str) -> dict[str, str]:
    """The command lines that serve the exported folders."""
    rank = max(e.rank for e in exported)
    max_rank = next(r for r in VLLM_RANKS if r >= rank)
    modules = " ".join(f"{e.user_id}={e.folder.resolve()}" for e in exported)
    vllm = (
        f"vllm serve {served} --enable-lora --max-lora-rank {max_rank} "
        f"--max-loras {min(len(exported), 8)} --max-cpu-loras {len(exported)} --lora-modules {modules}"
    )
    request = {
        "inputs": "...",
        "parameters": {"adapter_id": str(exported[0].folder.resolve()), "adapter_source": "local"},
    }
    lorax = f"lorax-launcher --model-id {served}   # then per request: {json.dumps(request)}"
    return {"vllm": vllm, "lorax": lorax}
