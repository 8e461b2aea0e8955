"""Users' LoRA modules in the layout GPU servers load: vLLM (``--enable-lora --lora-modules``) and LoRAX
(``adapter_source: local``), with the base model they were trained over.

One export is one folder, written all at once (every user is checked first; a refused export writes
nothing)::

    OUT/base/                  the base tailorlm trains over: the store's base model as loaded (the default
                               one dequantized from its GGUF file), with the store's task adapter merged
                               (OPPU); safetensors, config and tokenizer, a Hugging Face folder
    OUT/adapters/<name>/       one PEFT LoRA folder per user, under the name the server serves them by
    OUT/tailorlm-export.json   which user each name is, the ranks, and the command that serves them

The hub's SmolLM2-135M-Instruct is not that base (its weights were quantized to Q4_1 and back), so the
command serves ``OUT/base``; ``base_model_name_or_path`` in each adapter names it (vLLM's resolver
requires them equal, and stock PEFT's ``AutoPeftModelForCausalLM`` loads the base from it).

Every folder is checked against the rules vLLM and LoRAX apply and against the base model's config
(``adapter_problems``). Other kinds are refused: neither server loads IA3, bottleneck adapters or prompt
tuning.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from tailorlm.files import atomic_folder, json_text
from tailorlm.models import BaseModel
from tailorlm.store import module_folder
from tailorlm.users.errors import UserError
from tailorlm.users.service import UserService

FORMATS = ("vllm", "lorax")
# vLLM's choices for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks). A smaller adapter loads under a
# larger limit (vLLM and LoRAX pad it), so the flag is the smallest choice at or above the largest rank.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The projections vLLM and LoRAX adapt in a llama-family model, and the block each lives in.
BLOCKS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
SUPPORTED_TARGETS = tuple(BLOCKS)
BASE_FOLDER = "base"
ADAPTERS_FOLDER = "adapters"
MANIFEST_FILE = "tailorlm-export.json"
# A served name vLLM's ``--lora-modules name=path`` parser, a URL and a shell all take as it is.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<proj>\w+)"
    r"\.(?P<part>lora_A|lora_B)\.weight"
)
# Config fields PEFT reads that change which weights are adapted, or how much, in ways vLLM or LoRAX
# ignore: the served adapter would then compute something else than the trained one.
_IGNORED_BY_SERVERS = {
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layers_to_transform": "a subset of layers (layers_to_transform)",
    "layers_pattern": "a subset of layers (layers_pattern)",
}


@dataclass(frozen=True)
class Exported:
    user_id: str
    name: str  # the name the server serves this user's adapter by
    folder: Path
    rank: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Export:
    """A finished export: where it is, what the adapters' base is called on the server, and the users."""

    out: Path
    base: str  # the model the command serves: OUT/base (absolute), or --served-name
    users: list[Exported]

    @property
    def max_lora_rank(self) -> int:
        return max_lora_rank(max(e.rank for e in self.users))

    @property
    def renamed(self) -> dict[str, str]:
        """Users served under another name than their id: user id -> served name."""
        return {e.user_id: e.name for e in self.users if e.name != e.user_id}


def max_lora_rank(rank: int) -> int:
    """vLLM's ``--max-lora-rank`` for adapters up to ``rank``."""
    if rank > VLLM_RANKS[-1]:
        raise UserError(f"rank {rank} is above the largest vLLM serves ({VLLM_RANKS[-1]})")
    return next(r for r in VLLM_RANKS if r >= rank)


def served_name(user_id: str) -> str:
    """The name the server serves ``user_id``'s adapter by: the id itself when vLLM's parser, a shell and
    a URL all take it unchanged; else a cleaned id with a hash of the real one, so two ids never share a
    name (the export's manifest and output say which user it is)."""
    if _SAFE_NAME.fullmatch(user_id):
        return user_id
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", user_id).strip("_.-")[:40]
    digest = hashlib.sha256(user_id.encode()).hexdigest()[:8]
    return f"user-{cleaned}-{digest}" if cleaned else f"user-{digest}"


def export_users(
    service: UserService, user_ids: Sequence[str], out: Path, served: str | None = None
) -> Export:
    """Each user's current LoRA version as ``out/adapters/<name>/``, with the base they were trained over
    in ``out/base/`` (or, with ``served``, no base: the command then serves that name, which must be the
    same weights). Everything is checked before anything is written, and ``out`` appears in one rename:
    a refused export leaves nothing behind, and a previous export in ``out`` is replaced whole."""
    if not user_ids:
        raise UserError("name the users to export")
    _check_out(out)
    base = service.load_base()()
    shapes = base_shapes(base.model.config)
    base_name = served or str((out / BASE_FOLDER).resolve())
    names: dict[str, str] = {}
    plans = []
    for user_id in dict.fromkeys(user_ids):
        name = served_name(user_id)
        if name in names:
            raise UserError(f"users {names[name]!r} and {user_id!r} would both be served as {name!r}")
        names[name] = user_id
        source, config = _plan(service, user_id)
        config = {**config, "base_model_name_or_path": base_name}
        problems = adapter_problems(config, source / module_folder.WEIGHTS_FILE, shapes)
        if problems:
            raise UserError(f"user {user_id!r} cannot be exported: " + "; ".join(problems))
        plans.append((user_id, name, source, config))
    users = [
        Exported(
            user_id, name, out / ADAPTERS_FOLDER / name, int(config["r"]), tuple(config["target_modules"])
        )
        for user_id, name, _, config in plans
    ]
    result = Export(out, base_name, users)
    with atomic_folder(out) as staging:
        if served is None:
            _write_base(base, staging / BASE_FOLDER)
        for _, name, source, config in plans:
            folder = staging / ADAPTERS_FOLDER / name
            folder.mkdir(parents=True)
            shutil.copy2(source / module_folder.WEIGHTS_FILE, folder / module_folder.WEIGHTS_FILE)
            (folder / module_folder.PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
            check_folder(folder, base_name, shapes)  # what was written is what was checked
        (staging / MANIFEST_FILE).write_text(json_text(manifest(result)))
    return result


def _check_out(out: Path) -> None:
    """``out`` is replaced whole, so it must be new, empty or an earlier export: never a folder of other
    files that the export would delete."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise UserError(
            f"{out} holds files that are not an export (no {MANIFEST_FILE}); an export replaces its folder "
            "whole, so give a new or empty one"
        )


def _write_base(base: BaseModel, folder: Path) -> None:
    # save_pretrained writes the weights exactly as they are in memory (fp32 by default), ties included;
    # the tokenizer goes with them so the server renders the same chat template.
    base.model.save_pretrained(str(folder), safe_serialization=True)
    base.tokenizer.save_pretrained(str(folder))


def _plan(service: UserService, user_id: str) -> tuple[Path, dict[str, Any]]:
    store = service.store
    record = store.current(user_id)
    if record is None:
        raise UserError(f"user {user_id!r} has no module in {store.location}")
    if record.kind != "lora":
        raise UserError(
            f"user {user_id!r} has a {record.kind} module: vLLM and LoRAX load LoRA only (IA3 is a full-rank "
            "change of the weights, and bottleneck adapters and prompt tuning have no LoRA form); serve this "
            f"user with tailorlm serve, or {_retrain_hint(service, user_id)}"
        )
    store.get(user_id)  # the checksum holds before anything is copied
    folder = store.folder(user_id)
    return folder, json.loads((folder / module_folder.PEFT_CONFIG_FILE).read_text())


def _retrain_hint(service: UserService, user_id: str) -> str:
    """How to give an existing user a LoRA module. Only ``users import`` changes an existing user's kind
    (``users add`` refuses an id that exists), and only for a user of the store's task; ``--users`` splits
    on commas, so an id holding one cannot be named there."""
    task = service.settings().task
    if task is None or "," in user_id:
        return (
            "give them a new user id with a LoRA module (tailorlm users add NEW_ID --kind lora) and post "
            "their history to it: an existing user's kind changes only through users import"
        )
    store = shlex.quote(service.location)
    return (
        f"retrain them as LoRA (history kept): tailorlm users import {shlex.quote(task)} --users "
        f"{shlex.quote(user_id)} --kind lora --store {store} && tailorlm users train {shlex.quote(user_id)} "
        f"--store {store} (if they came from that task; otherwise add a new user with --kind lora)"
    )


def base_shapes(config: Any) -> dict[str, Any]:
    """What an adapter must fit, from a base model's config: the layer count and each supported
    projection's ``(out, in)`` features, as vLLM derives them for a llama-family model."""
    try:
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        inner = int(config.intermediate_size)
        layers = int(config.num_hidden_layers)
    except (AttributeError, TypeError) as error:
        raise UserError(
            f"the base model's config is not a llama-family config vLLM adapts ({error})"
        ) from None
    attention = heads * head_dim
    return {
        "layers": layers,
        "q_proj": (attention, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, attention),
        "gate_proj": (inner, hidden),
        "up_proj": (inner, hidden),
        "down_proj": (hidden, inner),
    }


def check_folder(folder: Path, served: str, shapes: Mapping[str, Any]) -> None:
    """Every rule vLLM and LoRAX apply to a LoRA folder, for a base of ``shapes`` (``base_shapes``)
    served as ``served``; a broken one raises ``UserError`` naming each problem."""
    config = json.loads((folder / module_folder.PEFT_CONFIG_FILE).read_text())
    problems = adapter_problems(config, folder / module_folder.WEIGHTS_FILE, shapes)
    if config.get("base_model_name_or_path") != served:
        problems.append(
            f"base_model_name_or_path is {config.get('base_model_name_or_path')!r}, not {served!r}"
        )
    if problems:
        raise UserError(f"{folder}: " + "; ".join(problems))


def adapter_problems(config: Mapping[str, Any], weights: Path, shapes: Mapping[str, Any]) -> list[str]:
    """Why vLLM or LoRAX would refuse this adapter, or serve it differently from PEFT: its config, then
    every tensor against the base's layer count and projection shapes. Empty when it is servable."""
    problems = []
    rank = config.get("r")
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    if not isinstance(rank, int) or not 1 <= rank <= VLLM_RANKS[-1]:
        problems.append(f"rank {rank} is not between 1 and {VLLM_RANKS[-1]}, the largest vLLM serves")
    targets = config.get("target_modules") or ()
    targets = [targets] if isinstance(targets, str) else list(targets)
    unsupported = sorted(set(targets) - set(SUPPORTED_TARGETS))
    if unsupported or not targets:
        problems.append(f"target modules {unsupported or 'none'} are not among {SUPPORTED_TARGETS}")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("a LoRA bias is not supported")
    if config.get("use_dora") or config.get("modules_to_save"):
        problems.append("DoRA and modules_to_save are not supported")
    if config.get("use_rslora"):
        problems.append("use_rslora: LoRAX ignores it and scales by alpha / r, so outputs would change")
    for field, what in _IGNORED_BY_SERVERS.items():
        if config.get(field):
            problems.append(f"{what} is not supported: the servers adapt every layer alike")
    if config.get("init_lora_weights") not in (True, False, "gaussian"):
        problems.append(
            f"init_lora_weights {config.get('init_lora_weights')!r} (PiSSA/LoftQ-style) is not supported"
        )
    if isinstance(rank, int) and not unsupported:
        problems += _weight_problems(weights, rank, set(targets), shapes)
    return problems


def _weight_problems(path: Path, rank: int, targets: set[str], shapes: Mapping[str, Any]) -> list[str]:
    problems = []
    found: dict[tuple[int, str], set[str]] = {}
    with safe_open(str(path), "pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = _KEY.fullmatch(key)
            if match is None:
                problems.append(
                    f"tensor {key!r} is not named "
                    "base_model.model.model.layers.<i>.<block>.<proj>.lora_A/B.weight"
                )
                continue
            layer, proj, part = int(match["layer"]), match["proj"], match["part"]
            if proj not in targets or match["block"] != BLOCKS[proj]:
                problems.append(f"tensor {key} adapts {match['block']}.{proj}, not one of the target modules")
                continue
            if layer >= shapes["layers"]:
                problems.append(
                    f"tensor {key} is in layer {layer}; the base model has {shapes['layers']} layers"
                )
                continue
            found.setdefault((layer, proj), set()).add(part)
            out_features, in_features = shapes[proj]
            expected = (rank, in_features) if part == "lora_A" else (out_features, rank)
            shape = tuple(weights.get_slice(key).get_shape())
            if shape != expected:
                problems.append(f"tensor {key} has shape {list(shape)}, not {list(expected)}")
    # vLLM and LoRAX take a projection's presence from the first layer they read: one missing elsewhere
    # is silently not adapted (LoRAX drops it in every layer), so every layer must have every target.
    for layer in range(shapes["layers"]):
        for proj in sorted(targets):
            parts = found.get((layer, proj), set())
            missing = sorted({"lora_A", "lora_B"} - parts)
            if missing:
                problems.append(f"layer {layer} {proj} has no {' or '.join(missing)}")
    return problems


def manifest(export: Export) -> dict[str, Any]:
    """What ``OUT/tailorlm-export.json`` holds: the base, each user's served name and folder, the rank
    flag, and the commands."""
    return {
        "base": export.base,
        "max_lora_rank": export.max_lora_rank,
        "users": [
            {
                "user": e.user_id,
                "served_name": e.name,
                "folder": str(e.folder.relative_to(export.out)),
                "rank": e.rank,
            }
            for e in export.users
        ],
        "commands": commands(export),
    }


def _lora_module(item: Exported) -> str:
    """One ``--lora-modules`` value. vLLM reads ``name=path`` only when the value has one ``=`` and no
    ``,``; a path with either goes in its JSON form (the served names never hold them)."""
    path = str(item.folder.resolve())
    if "=" in path or "," in path:
        return json.dumps({"name": item.name, "path": path})
    return f"{item.name}={path}"


def commands(export: Export, port: int = 8000) -> dict[str, str]:
    """The command lines that serve the export, shell-quoted so they run as printed: vLLM's, LoRAX's, and
    a LoRAX request for the first user (LoRAX names an adapter per request, by its folder)."""
    q = shlex.quote
    count = len(export.users)
    modules = " ".join(q(_lora_module(e)) for e in export.users)
    # fp32: the dtype the modules were trained and checked in; vLLM's "auto" would serve an fp32 folder
    # in fp16.
    vllm = (
        f"vllm serve {q(export.base)} --dtype float32 --port {port} --enable-lora "
        f"--max-lora-rank {export.max_lora_rank} --max-loras {min(count, 8)} --max-cpu-loras {count} "
        f"--lora-modules {modules}"
    )
    first = export.users[0]
    request = {
        "inputs": "Hello",
        "parameters": {
            "adapter_id": str(first.folder.resolve()),
            "adapter_source": "local",
            "max_new_tokens": 32,
        },
    }
    lorax = f"lorax-launcher --model-id {q(export.base)} --port {port}"
    lorax_request = (
        f"curl http://127.0.0.1:{port}/generate -H 'Content-Type: application/json' "
        f"-d {q(json.dumps(request))}"
    )
    return {"vllm": vllm, "lorax": lorax, "lorax_request": lorax_request}
