"""One user's module on disk: a folder.

A kind that PEFT has is written in PEFT's own format (``adapter_config.json`` +
``adapter_model.safetensors``), so ``PeftModel.from_pretrained(base, folder)`` reads it; a kind PEFT lacks
uses the same safetensors file with the keys its kind's file documents (``tailorlm.kinds``). The tensors
are the bank's, named as in the bank. Every module folder also has ``tailorlm.json``: the spec, the base
model's name, the storage dtype and whatever the trainer recorded (user id, epochs, validation loss).

Tensors are stored in fp16 by default (half the bytes; loading casts back to the bank's dtype).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from tailorlm import kinds
from tailorlm.files import atomic_folder
from tailorlm.kinds import ModuleSpec, ModuleSpecError

if TYPE_CHECKING:
    from tailorlm.engine.engine import Engine

WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
META_FILE = "tailorlm.json"
FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModuleFileError(ValueError):
    """A module folder is missing a file, is not a module tailorlm can read, or does not fit the bank."""


class NonFiniteModuleError(ModuleFileError):
    """A module holds NaN or infinite numbers: a training that diverged (or a value beyond the storage
    dtype's range), or a damaged or foreign file. Never written, never read: served, it would answer
    NaN scores for its user."""


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """``NonFiniteModuleError`` naming ``where`` and the first tensor (by name) with a NaN or an inf."""
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteModuleError(
                f"{where}: tensor {name} holds NaN or infinite values (a training that diverged, or a "
                "value beyond the storage dtype's range)"
            )


@dataclass
class StoredModule:
    spec: ModuleSpec
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)


def save_module(
    engine: Engine, slot: int, folder: str | Path, *, dtype: str = "float16", meta: dict | None = None
) -> Path:
    """Write slot ``slot``'s module to ``folder``, replacing it atomically (a reader or a resumed job
    never sees half a module)."""
    stored = StoredModule(engine.spec, engine.bank.read(slot), dict(meta or {}))
    return write_module(stored, folder, model=engine.model, base_name=engine.base.name, dtype=dtype)


def write_module(
    module: StoredModule, folder: str | Path, *, model, base_name: str | None = None, dtype: str = "float16"
) -> Path:
    """Write a module (tensors named as in the bank) for a base ``model``."""
    if dtype not in _DTYPES:
        raise ModuleFileError(f"unknown storage dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    folder = Path(folder)
    with atomic_folder(folder) as staging:
        tensors = {name: t.detach().to(_DTYPES[dtype]).contiguous() for name, t in module.tensors.items()}
        check_finite(tensors, f"a module stored as {dtype}")  # after the cast: fp16 overflows to inf
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        config = kinds.of(module.spec).peft_config(module.spec, model, base_name)
        if config is not None:
            config.save_pretrained(str(staging))
        meta = {
            "format_version": FORMAT_VERSION,
            "spec": kinds.spec_to_dict(module.spec),
            "base_model": base_name,
            "dtype": dtype,
            **module.meta,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder


def read_module(folder: str | Path) -> StoredModule:
    """Read a module folder written by tailorlm, or a LoRA / IA3 / prompt-tuning folder written by PEFT."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModuleFileError(f"{folder} is not a module folder: {WEIGHTS_FILE} is missing")
    meta = read_json(folder / META_FILE) if (folder / META_FILE).is_file() else {}
    try:
        if "spec" in meta:
            spec = kinds.spec_from_dict(meta["spec"])
        elif (folder / PEFT_CONFIG_FILE).is_file():
            spec = kinds.spec_from_peft_config(read_json(folder / PEFT_CONFIG_FILE))
        else:
            raise ModuleFileError(
                f"{folder} has neither {META_FILE} nor {PEFT_CONFIG_FILE}: its kind is unknown"
            )
    except (ModuleSpecError, KeyError, TypeError) as error:
        raise ModuleFileError(f"{folder}: unreadable module config: {error}") from error
    try:
        tensors = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise ModuleFileError(f"{weights}: not a readable safetensors file ({error})") from error
    check_finite(tensors, str(weights))
    return StoredModule(spec, tensors, meta)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModuleFileError(f"{path}: not valid JSON ({error})") from error


def read_for(spec: ModuleSpec, folder: str | Path) -> StoredModule:
    """Read a module folder for a bank of ``spec``: a module of another layout is an error naming both;
    tensor names as other tools wrote them are mapped to the bank's."""
    stored = read_module(folder)
    if not kinds.same_layout(stored.spec, spec):
        raise ModuleFileError(
            f"{folder} holds a {kinds.spec_to_dict(stored.spec)} module; this bank holds "
            f"{kinds.spec_to_dict(spec)}"
        )
    return StoredModule(spec, kinds.of(spec).normalize_names(stored.tensors), stored.meta)


def module_bytes(folder: str | Path) -> int:
    """Bytes a stored module takes on disk (weights and configs)."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
