"""IA3: learned scaling vectors (Liu et al., 2022). Attention projections scale their outputs,
feed-forward projections scale their inputs, as in PEFT.

Per user and adapted projection one tensor ``ia3_l``: ``[out, 1]`` for an output scale, ``[1, in]`` for an
input scale (PEFT's shapes and keys). The identity is all ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tailorlm.kinds.kind import ModuleKind, ModuleSpecError, base_linear, by_site, names_list


@dataclass(frozen=True)
class IA3Spec:
    """Learned scaling vectors: outputs of attention projections, inputs of feed-forward projections."""

    targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward: tuple[str, ...] = ("down_proj",)
    kind: ClassVar[str] = "ia3"


class IA3(ModuleKind):
    name = "ia3"
    spec_type = IA3Spec
    peft_type = "IA3"
    learning_rate = 1e-2

    def validate(self, spec: IA3Spec) -> None:
        if not spec.targets:
            raise ModuleSpecError("an IA3 module needs at least one target projection")
        if not set(spec.feedforward) <= set(spec.targets):
            raise ModuleSpecError("IA3 feed-forward modules must also be targets")

    def targets(self, spec: IA3Spec) -> tuple[str, ...]:
        return spec.targets

    def same_layout(self, a: IA3Spec, b: IA3Spec) -> bool:
        return (sorted(a.targets), sorted(a.feedforward)) == (sorted(b.targets), sorted(b.feedforward))

    def linear_shapes(self, spec: IA3Spec, short_name: str, linear: nn.Linear) -> dict[str, tuple[int, ...]]:
        return {
            "ia3_l": (1, linear.in_features) if short_name in spec.feedforward else (linear.out_features, 1)
        }

    def identity_value(self, suffix: str) -> float:
        return 1.0

    def apply_linear(
        self,
        spec: IA3Spec,
        short_name: str,
        base: nn.Linear,
        x: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
        slot_ids: torch.Tensor,
        training: bool,
    ) -> torch.Tensor:
        scale = stack["ia3_l"].index_select(0, slot_ids).flatten(1).unsqueeze(1)  # [rows, 1, features]
        # As PEFT: the product in the module's dtype (fp32), handed on in the base's dtype.
        if short_name in spec.feedforward:
            return base((x.to(scale.dtype) * scale).to(x.dtype))
        return (base(x) * scale).to(x.dtype)

    def peft_config(self, spec: IA3Spec, model: nn.Module, base_name: str | None) -> Any:
        from peft import IA3Config, TaskType

        return IA3Config(
            target_modules=list(spec.targets),
            feedforward_modules=list(spec.feedforward),
            task_type=TaskType.CAUSAL_LM,
            base_model_name_or_path=base_name,
        )

    def spec_from_peft(self, config: Mapping[str, Any]) -> IA3Spec:
        spec = IA3Spec(
            targets=tuple(sorted(names_list(config["target_modules"]))),
            feedforward=tuple(sorted(names_list(config.get("feedforward_modules") or []))),
        )
        self.validate(spec)
        return spec

    def normalize_names(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name.removesuffix(".default"): value for name, value in tensors.items()}

    def merge_into_base(self, spec: IA3Spec, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> int:
        """An input scale multiplies the weight's columns, an output scale its rows (and the bias)."""
        sites = by_site(self.normalize_names(tensors), "ia3_l")
        with torch.no_grad():
            for path, own in sites.items():
                linear = base_linear(model, path)
                scale = own["ia3_l"].to(linear.weight.dtype)  # [out, 1] or [1, in]: broadcasts on W
                linear.weight *= scale
                if linear.bias is not None and scale.shape[-1] == 1:
                    linear.bias *= scale.flatten()
        return len(sites)
