"""The per-user module kinds and their weight layout: the one place that knows which tensors a user owns.

Every user's tensors for one adapted projection are stacked along a leading slot axis (``[slots, ...]``).
A tensor's name is also its key on disk, so a slot slice saved as-is is a module file: PEFT's own keys
for LoRA, IA3 and prompt tuning (read by ``PeftModel.from_pretrained``), and tailorlm's documented keys
for the bottleneck adapter, which PEFT does not have.

Slot 0 always holds the identity module (LoRA and adapter terms zero, IA3 scales one, prompt rows masked
out), so rows that use the bare base model share a batch with personal rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

PEFT_PREFIX = "base_model.model."


class ModuleSpecError(ValueError):
    """A module spec names projections the base model does not have, or has a value out of range."""


@dataclass(frozen=True)
class LoraSpec:
    """Low-rank update ``W + (alpha / rank) * B A`` on the named linear projections."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    kind: ClassVar[str] = "lora"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class IA3Spec:
    """Learned scaling vectors: outputs of attention projections, inputs of feed-forward projections."""

    targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward: tuple[str, ...] = ("down_proj",)
    kind: ClassVar[str] = "ia3"


@dataclass(frozen=True)
class PromptSpec:
    """Virtual token embeddings placed right before each row's text."""

    virtual_tokens: int = 16
    kind: ClassVar[str] = "prompt"
    targets: tuple[str, ...] = field(default=(), init=False)


@dataclass(frozen=True)
class BottleneckSpec:
    """A residual down/up projection after a sublayer's output projection (Houlsby: after attention and
    feed-forward; Pfeiffer: after feed-forward only), width ``hidden / reduction_factor``."""

    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    reduction_factor: int = 16
    activation: Literal["silu", "relu", "gelu"] = "silu"
    attention_output: str = "o_proj"
    feedforward_output: str = "down_proj"
    kind: ClassVar[str] = "bottleneck"

    @property
    def targets(self) -> tuple[str, ...]:
        if self.placement == "pfeiffer":
            return (self.feedforward_output,)
        return (self.attention_output, self.feedforward_output)


ModuleSpec = LoraSpec | IA3Spec | PromptSpec | BottleneckSpec
SPEC_TYPES: dict[str, type] = {
    "lora": LoraSpec,
    "ia3": IA3Spec,
    "prompt": PromptSpec,
    "bottleneck": BottleneckSpec,
}


def spec_to_dict(spec: ModuleSpec) -> dict:
    fields = {k: v for k, v in asdict(spec).items() if spec.__dataclass_fields__[k].init}
    return {"kind": spec.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def spec_from_dict(data: dict) -> ModuleSpec:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in SPEC_TYPES:
        raise ModuleSpecError(f"unknown module kind {kind!r}; expected one of {sorted(SPEC_TYPES)}")
    spec_type = SPEC_TYPES[kind]
    allowed = {f for f in spec_type.__dataclass_fields__ if spec_type.__dataclass_fields__[f].init}
    unknown = set(data) - allowed
    if unknown:
        raise ModuleSpecError(
            f"{kind} module has no setting(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return validate(spec_type(**converted))


def validate(spec: ModuleSpec) -> ModuleSpec:
    if isinstance(spec, LoraSpec) and (spec.rank < 1 or not spec.targets):
        raise ModuleSpecError("a LoRA module needs rank >= 1 and at least one target projection")
    if isinstance(spec, LoraSpec) and not 0.0 <= spec.dropout < 1.0:
        raise ModuleSpecError(f"LoRA dropout must be in [0, 1), got {spec.dropout}")
    if isinstance(spec, IA3Spec) and not set(spec.feedforward) <= set(spec.targets):
        raise ModuleSpecError("IA3 feed-forward modules must also be targets")
    if isinstance(spec, PromptSpec) and spec.virtual_tokens < 1:
        raise ModuleSpecError("prompt tuning needs at least one virtual token")
    if isinstance(spec, BottleneckSpec) and spec.reduction_factor < 1:
        raise ModuleSpecError("the bottleneck reduction factor must be >= 1")
    return spec


# --------------------------------------------------------------------------------------------------
# Tensor layout per kind: name suffix -> per-slot shape, identity value for slot 0, fresh-user init.
# --------------------------------------------------------------------------------------------------


def linear_tensor_shapes(spec: ModuleSpec, short_name: str, linear: nn.Linear) -> dict[str, tuple[int, ...]]:
    """Per-slot shapes of the tensors one user owns on one adapted projection, keyed by the suffix that
    follows the projection's path in the tensor's name."""
    d_in, d_out = linear.in_features, linear.out_features
    if isinstance(spec, LoraSpec):
        return {"lora_A.weight": (spec.rank, d_in), "lora_B.weight": (d_out, spec.rank)}
    if isinstance(spec, IA3Spec):
        return {"ia3_l": (1, d_in) if short_name in spec.feedforward else (d_out, 1)}
    if isinstance(spec, BottleneckSpec):
        width = max(1, d_out // spec.reduction_factor)
        return {
            "adapter_down.weight": (width, d_out),
            "adapter_down.bias": (width,),
            "adapter_up.weight": (d_out, width),
            "adapter_up.bias": (d_out,),
        }
    raise ModuleSpecError(f"{spec.kind} modules do not adapt linear projections")


def identity_value(suffix: str) -> float:
    """What slot 0 (no personal module) holds: scales of one, every additive term zero."""
    return 1.0 if suffix == "ia3_l" else 0.0


def init_user_tensor(suffix: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    """Fresh-user initialisation, the same as PEFT's defaults so a new module starts as the identity:
    LoRA A Kaiming-uniform and B zero; IA3 ones; prompt tokens small random; adapter down small random,
    up zero."""
    with torch.no_grad():
        if suffix == "lora_A.weight":
            bound = 1.0 / math.sqrt(tensor.shape[-1])  # kaiming_uniform_(a=sqrt(5)) reduces to this bound
            tensor.uniform_(-bound, bound, generator=generator)
        elif suffix == "prompt_embeddings" or suffix == "adapter_down.weight":
            tensor.normal_(0.0, 0.02, generator=generator)
        else:
            tensor.fill_(identity_value(suffix))


_ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}


def apply_to_linear(
    spec: ModuleSpec,
    short_name: str,
    base: nn.Linear,
    x: torch.Tensor,
    rows: dict[str, torch.Tensor],
    training: bool,
) -> torch.Tensor:
    """The adapted projection for a batch whose row ``b`` uses the tensors ``rows[suffix][b]``: the base
    matmul once for the whole batch, each row's own term added with a batched matmul."""
    if isinstance(spec, LoraSpec):
        hidden = F.dropout(x, spec.dropout, training) if spec.dropout and training else x
        update = (hidden @ rows["lora_A.weight"].transpose(1, 2)) @ rows["lora_B.weight"].transpose(1, 2)
        return base(x) + spec.scale * update
    if isinstance(spec, IA3Spec):
        scale = rows["ia3_l"].flatten(1).unsqueeze(1)  # [batch, 1, features]
        return base(x * scale) if short_name in spec.feedforward else base(x) * scale
    if isinstance(spec, BottleneckSpec):
        out = base(x)
        act = _ACTIVATIONS[spec.activation]
        down = torch.baddbmm(
            rows["adapter_down.bias"].unsqueeze(1), out, rows["adapter_down.weight"].transpose(1, 2)
        )
        up = torch.baddbmm(
            rows["adapter_up.bias"].unsqueeze(1), act(down), rows["adapter_up.weight"].transpose(1, 2)
        )
        return out + up
    raise ModuleSpecError(f"{spec.kind} modules do not adapt linear projections")


# --------------------------------------------------------------------------------------------------
# On-disk names and PEFT configs.
# --------------------------------------------------------------------------------------------------


def tensor_name(spec: ModuleSpec, module_path: str, suffix: str) -> str:
    """A user's tensor's name in the bank and its key on disk."""
    if isinstance(spec, PromptSpec):
        return "prompt_embeddings"
    if isinstance(spec, BottleneckSpec):
        return f"{module_path}.{suffix}"
    return f"{PEFT_PREFIX}{module_path}.{suffix}"


def peft_config(spec: ModuleSpec, model: nn.Module, base_name: str | None):
    """The PEFT config object describing ``spec`` on ``model``; None for the bottleneck adapter."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType

    if isinstance(spec, LoraSpec):
        return LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.targets),
            task_type=TaskType.CAUSAL_LM,
            base_model_name_or_path=base_name,
        )
    if isinstance(spec, IA3Spec):
        return IA3Config(
            target_modules=list(spec.targets),
            feedforward_modules=list(spec.feedforward),
            task_type=TaskType.CAUSAL_LM,
            base_model_name_or_path=base_name,
        )
    if isinstance(spec, PromptSpec):
        config = model.config
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=spec.virtual_tokens,
            token_dim=config.hidden_size,
            num_transformer_submodules=1,
            num_attention_heads=config.num_attention_heads,
            num_layers=config.num_hidden_layers,
            base_model_name_or_path=base_name,
        )
    return None


def spec_from_peft_config(data: dict) -> ModuleSpec:
    """Read a PEFT ``adapter_config.json`` (as a dict) back into a spec."""
    peft_type = data.get("peft_type")
    if peft_type == "LORA":
        return validate(
            LoraSpec(
                rank=int(data["r"]),
                alpha=float(data["lora_alpha"]),
                dropout=float(data.get("lora_dropout") or 0.0),
                targets=tuple(sorted(_as_list(data["target_modules"]))),
            )
        )
    if peft_type == "IA3":
        return validate(
            IA3Spec(
                targets=tuple(sorted(_as_list(data["target_modules"]))),
                feedforward=tuple(sorted(_as_list(data.get("feedforward_modules") or []))),
            )
        )
    if peft_type == "PROMPT_TUNING":
        return validate(PromptSpec(virtual_tokens=int(data["num_virtual_tokens"])))
    raise ModuleSpecError(f"PEFT type {peft_type!r} is not one tailorlm can load (LORA, IA3, PROMPT_TUNING)")


def _as_list(value) -> list[str]:
    if isinstance(value, str):
        raise ModuleSpecError(
            f"target_modules given as a pattern ({value!r}); tailorlm needs a list of names"
        )
    return list(value)


def same_layout(a: ModuleSpec, b: ModuleSpec) -> bool:
    """Whether two specs give users tensors of the same names and shapes (dropout may differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, LoraSpec):
        return (a.rank, a.alpha, tuple(sorted(a.targets))) == (b.rank, b.alpha, tuple(sorted(b.targets)))
    if isinstance(a, IA3Spec):
        return (sorted(a.targets), sorted(a.feedforward)) == (sorted(b.targets), sorted(b.feedforward))
    return a == b
