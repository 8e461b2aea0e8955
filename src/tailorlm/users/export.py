"""Users' LoRA modules in the layout GPU servers load: vLLM (``--enable-lora --lora-modules``) and LoRAX
(``adapter_source: local``), or llama.cpp's ``llama-server --lora`` (GGUF), with the base model they were
trained over.

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

For llama.cpp the base is the GGUF file the store's base came from (``OUT/base.gguf``, the very
weights tailorlm dequantized), the adapters are ``OUT/adapters/<name>.gguf`` as llama.cpp's
convert_lora_to_gguf.py writes them, and a store's LoRA task adapter is ``OUT/task-adapter.gguf``,
applied with each user's (llama.cpp cannot merge it into a quantized base).

Every adapter is checked against the rules vLLM and LoRAX apply and against the base model's config
(``adapter_problems``). Other kinds are refused: none of these servers loads IA3, bottleneck adapters or
prompt tuning.
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

import gguf
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tailorlm import models
from tailorlm.files import atomic_folder, json_text
from tailorlm.models import BaseModel
from tailorlm.store import module_folder
from tailorlm.users.errors import UserError
from tailorlm.users.service import UserService

FORMATS = ("vllm", "lorax", "gguf")
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
GGUF_BASE_FILE = "base.gguf"
GGUF_TASK_FILE = "task-adapter.gguf"
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


VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Exported:
    user_id: str
    name: str  # the name the server serves this user's adapter by
    path: Path  # its folder (vllm, lorax) or GGUF file
    rank: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Export:
    """A finished export: where it is, what the adapters' base is called on the server, and the users."""

    out: Path
    format: str
    base: str  # the model the command serves: OUT/base or OUT/base.gguf (absolute), or --served-name
    users: list[Exported]
    task_adapter: Path | None = None  # gguf: the store's task adapter, applied with every user's
    # The base's dtype, as vLLM names it: the one the modules were trained on (``--dtype auto`` may have
    # chosen bf16), written as it is and served as it is.
    dtype: str = "float32"

    @property
    def max_lora_rank(self) -> int:
        return max_lora_rank(max(e.rank for e in self.users))


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
    service: UserService,
    user_ids: Sequence[str],
    out: Path,
    served: str | None = None,
    format: str = "vllm",
) -> Export:
    """Each user's current LoRA version as ``out/adapters/<name>/`` (``<name>.gguf`` for llama.cpp), with
    the base they were trained over in ``out/base/`` (``out/base.gguf``), or, with ``served``, no base:
    the command then serves that name, which must be the same weights. Everything is checked before
    anything is written, and ``out`` appears in one rename: a refused export leaves nothing behind, and a
    previous export in ``out`` is replaced whole."""
    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    if not user_ids:
        raise UserError("name the users to export")
    _check_out(out)
    base = service.load_base()()
    shapes = base_shapes(base.model.config)
    if format == "gguf":
        base_file = None if served else _base_gguf(service)
        task_adapter = _gguf_task_adapter(service, shapes)
        base_name = served or str((out / GGUF_BASE_FILE).resolve())
    else:
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
    suffix = ".gguf" if format == "gguf" else ""
    users = [
        Exported(
            user_id,
            name,
            out / ADAPTERS_FOLDER / f"{name}{suffix}",
            int(config["r"]),
            tuple(config["target_modules"]),
        )
        for user_id, name, _, config in plans
    ]
    if format == "gguf":
        return _write_gguf_export(
            Export(out, format, base_name, users, out / GGUF_TASK_FILE if task_adapter else None),
            base.model.config,
            base_file,
            task_adapter,
            [source for _, _, source, _ in plans],
        )
    result = Export(out, format, base_name, users, dtype=VLLM_DTYPES[base.model.dtype])
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
    # save_pretrained writes the weights exactly as they are in memory (the dtype trained on), ties included;
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
    """What ``OUT/tailorlm-export.json`` holds: the base, each user's served name and path (and, for
    llama.cpp, their adapter id), the rank flag, and the commands."""
    users = []
    for e in export.users:
        entry = {"user": e.user_id, "served_name": e.name, "path": str(e.path.relative_to(export.out))}
        if export.format == "gguf":
            entry["lora_id"] = lora_id(export, e)
        users.append({**entry, "rank": e.rank})
    return {
        "format": export.format,
        "base": export.base,
        "task_adapter": None
        if export.task_adapter is None
        else str(export.task_adapter.relative_to(export.out)),
        "max_lora_rank": None if export.format == "gguf" else export.max_lora_rank,
        "users": users,
        "commands": commands(export),
    }


def lora_id(export: Export, item: Exported) -> int:
    """llama-server numbers adapters in the order of its ``--lora`` flags: the task adapter first."""
    return export.users.index(item) + (export.task_adapter is not None)


def _lora_module(item: Exported) -> str:
    """One ``--lora-modules`` value. vLLM reads ``name=path`` only when the value has one ``=`` and no
    ``,``; a path with either goes in its JSON form (the served names never hold them)."""
    path = str(item.path.resolve())
    if "=" in path or "," in path:
        return json.dumps({"name": item.name, "path": path})
    return f"{item.name}={path}"


def _curl(url: str, body: Mapping[str, Any]) -> str:
    return f"curl {url} -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"


def commands(export: Export, port: int = 8000) -> dict[str, str]:
    """The command that serves the export (``serve``) and a request for its first user (``request``),
    shell-quoted so they run as printed."""
    q = shlex.quote
    count = len(export.users)
    first = export.users[0]
    if export.format == "vllm":
        modules = " ".join(q(_lora_module(e)) for e in export.users)
        # The dtype the modules were trained on, named: vLLM's "auto" would serve an fp32 folder in fp16.
        serve = (
            f"vllm serve {q(export.base)} --dtype {export.dtype} --port {port} --enable-lora "
            f"--max-lora-rank {export.max_lora_rank} --max-loras {min(count, 8)} --max-cpu-loras {count} "
            f"--lora-modules {modules}"
        )
        body: dict[str, Any] = {"model": first.name, "prompt": "Hello", "max_tokens": 32}
        return {"serve": serve, "request": _curl(f"http://127.0.0.1:{port}/v1/completions", body)}
    if export.format == "lorax":
        # LoRAX names an adapter per request, by its folder.
        adapter = {"adapter_id": str(first.path.resolve()), "adapter_source": "local"}
        body = {"inputs": "Hello", "parameters": {**adapter, "max_new_tokens": 32}}
        return {
            "serve": f"lorax-launcher --model-id {q(export.base)} --port {port}",
            "request": _curl(f"http://127.0.0.1:{port}/generate", body),
        }
    # llama-server loads every adapter at scale 0 (--lora-init-without-apply); a request names the
    # adapters it applies, the task adapter with the user's.
    files = ([export.task_adapter] if export.task_adapter else []) + [e.path for e in export.users]
    loras = " ".join(f"--lora {q(str(path.resolve()))}" for path in files)
    serve = f"llama-server -m {q(export.base)} --port {port} --lora-init-without-apply {loras}"
    applied = ([0] if export.task_adapter else []) + [lora_id(export, first)]
    body = {"prompt": "Hello", "n_predict": 32, "lora": [{"id": i, "scale": 1.0} for i in applied]}
    return {"serve": serve, "request": _curl(f"http://127.0.0.1:{port}/completion", body)}


def _base_gguf(service: UserService) -> Path:
    """The GGUF file of the store's base model: the default model's own file, or the file the store was
    made with. Its weights are what tailorlm dequantized and trained over."""
    name = service.settings().base_model
    if models.resolve(name)[0] == models.DEFAULT_MODEL:
        found = models.gguf_path()
        if found is not None:
            return found
    elif name is not None and name.lower().endswith(".gguf"):
        return Path(name).expanduser()
    raise UserError(
        f"llama.cpp serves a GGUF base, and this store's base model ({name or models.DEFAULT_MODEL}) is not "
        "a GGUF file: convert it with llama.cpp's convert_hf_to_gguf.py and give that file as --served-name"
    )


def _gguf_task_adapter(service: UserService, shapes: Mapping[str, Any]) -> Path | None:
    """The store's task adapter folder (OPPU), which llama.cpp applies beside each user's adapter; None
    without one. An IA3 task adapter has no llama.cpp form."""
    relative = service.settings().task_adapter
    if relative is None:
        return None
    folder = service.store.files.local(relative)
    stored = module_folder.read_module(folder)
    if stored.spec.kind != "lora":
        raise UserError(
            f"this store's task adapter is {stored.spec.kind}; llama.cpp applies LoRA adapters only, so its "
            "users can be served as trained by vLLM or LoRAX (their base has it merged) or tailorlm serve"
        )
    config = json.loads((folder / module_folder.PEFT_CONFIG_FILE).read_text())
    problems = adapter_problems(config, folder / module_folder.WEIGHTS_FILE, shapes)
    if problems:
        raise UserError("the store's task adapter cannot be exported: " + "; ".join(problems))
    return folder


def _write_gguf_export(
    export: Export, config: Any, base_file: Path | None, task_adapter: Path | None, sources: list[Path]
) -> Export:
    with atomic_folder(export.out) as staging:
        if base_file is not None:
            shutil.copy2(base_file, staging / GGUF_BASE_FILE)
        if task_adapter is not None:
            write_gguf_adapter(task_adapter, config, staging / GGUF_TASK_FILE)
        (staging / ADAPTERS_FOLDER).mkdir()
        for item, source in zip(export.users, sources, strict=True):
            write_gguf_adapter(source, config, staging / item.path.relative_to(export.out))
        (staging / MANIFEST_FILE).write_text(json_text(manifest(export)))
    return export


def llama_permute(rows: torch.Tensor, heads: int, kv_heads: int | None = None) -> torch.Tensor:
    """A q or k projection's output rows in the order llama.cpp's GGUF files keep them (interleaved
    rotary halves): ``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py. Rows of ``B`` permute
    like rows of ``W``, so ``W + s B A`` in that order is ``permute(W) + s permute(B) A``."""
    groups = kv_heads if kv_heads is not None and kv_heads != heads else heads
    shape = rows.shape
    return rows.reshape(groups, 2, shape[0] // groups // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_gguf_adapter(folder: Path, config: Any, path: Path) -> None:
    """A checked PEFT LoRA folder as the GGUF adapter llama.cpp's convert_lora_to_gguf.py writes for a
    llama model: ``general.type`` adapter, ``adapter.type`` lora, ``adapter.lora.alpha``, and per
    projection ``blk.<i>.<tensor>.weight.lora_a`` (A) and ``.lora_b`` (B, q and k rows permuted as the
    base GGUF's), in fp32."""
    if getattr(config, "model_type", None) != "llama":
        raise UserError(
            f"GGUF export handles llama models; the base is {getattr(config, 'model_type', None)}"
        )
    peft_config = json.loads((folder / module_folder.PEFT_CONFIG_FILE).read_text())
    tensors = load_file(str(folder / module_folder.WEIGHTS_FILE))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    writer = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(peft_config["lora_alpha"]))
    for key in sorted(k for k in tensors if k.endswith("lora_A.weight")):
        match = _KEY.fullmatch(key)
        weight = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        target = names.get_name(weight, try_suffixes=(".weight",))
        a = tensors[key].float()
        b = tensors[key.replace("lora_A", "lora_B")].float()
        if match["proj"] == "q_proj":
            b = llama_permute(b, heads)
        elif match["proj"] == "k_proj":
            b = llama_permute(b, heads, kv_heads)
        writer.add_tensor(f"{target}.lora_a", a.contiguous().numpy())
        writer.add_tensor(f"{target}.lora_b", b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
