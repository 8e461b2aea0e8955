"""LoRA: the low-rank update ``W x + (alpha / rank) * B A x`` on the named linear projections.

Per user and adapted projection: ``lora_A.weight`` ``[rank, in]`` and ``lora_B.weight`` ``[out, rank]``,
PEFT's own keys, so a saved module is a PEFT LoRA folder. A new user starts with A Kaiming-uniform and B
zero (PEFT's default), i.e. as the identity::

    x ──► base W ─────────────────┐
    │                             (+) ──► out
    └──► A [rank, in] ──► B [out, rank] ──► * alpha / rank
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from tailorlm.kinds.kind import ModuleKind, ModuleSpecError, base_linear, by_site, names_list


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


class Lora(ModuleKind):
    name = "lora"
    spec_type = LoraSpec
    peft_type = "LORA"
    # Chosen on verbagg validation users (docs/benchmark-results.md, "Tuning the per-user recipe").
    learning_rate = 1e-2

    def validate(self, spec: LoraSpec) -> None:
        if spec.rank < 1 or not spec.targets:
            raise ModuleSpecError("a LoRA module needs rank >= 1 and at least one target projection")
        if not 0.0 <= spec.dropout < 1.0:
            raise ModuleSpecError(f"LoRA dropout must be in [0, 1), got {spec.dropout}")

    def targets(self, spec: LoraSpec) -> tuple[str, ...]:
        return spec.targets

    def same_layout(self, a: LoraSpec, b: LoraSpec) -> bool:
        # Dropout only acts in training: two LoRA specs that differ in it hold interchangeable modules.
        return (a.rank, a.alpha, sorted(a.targets)) == (b.rank, b.alpha, sorted(b.targets))

    def exact_when_shared(self, spec: LoraSpec) -> bool:
        return spec.dropout == 0.0

    def linear_shapes(self, spec: LoraSpec, short_name: str, linear: nn.Linear) -> dict[str, tuple[int, ...]]:
        return {
            "lora_A.weight": (spec.rank, linear.in_features),
            "lora_B.weight": (linear.out_features, spec.rank),
        }

    def init_user(self, suffix: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        if suffix != "lora_A.weight":
            return super().init_user(suffix, tensor, generator)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(tensor.shape[-1])  # kaiming_uniform_(a=sqrt(5)) reduces to this bound
            tensor.uniform_(-bound, bound, generator=generator)

    def apply_linear(
        self,
        spec: LoraSpec,
        short_name: str,
        base: nn.Linear,
        x: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
        slot_ids: torch.Tensor,
        training: bool,
    ) -> torch.Tensor:
        a = stack["lora_A.weight"].index_select(0, slot_ids)  # [rows, rank, in]
        b = stack["lora_B.weight"].index_select(0, slot_ids)  # [rows, out, rank]
        # PEFT's mixed precision: the term in the module's dtype (fp32), added to the base output in it,
        # the sum back in the base's dtype. With an fp32 base every cast is a no-op.
        hidden = x.to(a.dtype)
        hidden = F.dropout(hidden, spec.dropout, training) if spec.dropout and training else hidden
        update = (hidden @ a.transpose(1, 2)) @ b.transpose(1, 2)  # [rows, positions, out]
        return (base(x) + spec.scale * update).to(x.dtype)

    def peft_config(self, spec: LoraSpec, model: nn.Module, base_name: str | None) -> Any:
        from peft import LoraConfig, TaskType

        return LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.targets),
            task_type=TaskType.CAUSAL_LM,
            base_model_name_or_path=base_name,
        )

    def spec_from_peft(self, config: Mapping[str, Any]) -> LoraSpec:
        spec = LoraSpec(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            targets=tuple(sorted(names_list(config["target_modules"]))),
        )
        self.validate(spec)
        return spec

    def normalize_names(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # PEFT writes "...lora_A.weight"; some versions and tools keep the adapter name
        # ("lora_A.default.weight").
        return {name.replace(".default.weight", ".weight"): value for name, value in tensors.items()}

    def merge_into_base(self, spec: LoraSpec, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> int:
        """``W += scale * B A`` on every adapted projection: OPPU's task adapter becomes part of the base
        that every personal module then builds on."""
        sites = by_site(self.normalize_names(tensors), "lora_")
        with torch.no_grad():
            for path, pair in sites.items():
                if set(pair) != {"lora_A.weight", "lora_B.weight"}:
                    raise ModuleSpecError(f"LoRA module is incomplete at {path}: has {sorted(pair)}")
                linear = base_linear(model, path)
                delta = spec.scale * (pair["lora_B.weight"].float() @ pair["lora_A.weight"].float())
                linear.weight += delta.to(linear.weight.dtype)
        return len(sites)
