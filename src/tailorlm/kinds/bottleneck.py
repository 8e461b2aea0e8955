"""The bottleneck adapter (Houlsby et al., 2019; Pfeiffer et al., 2020): a residual down/up projection
applied to a sublayer's output projection, ``out + up(act(down(out)))``. Houlsby places one after
attention (``o_proj``) and one after the feed-forward block (``down_proj``); Pfeiffer only the latter.

PEFT has no such kind, so its keys are tailorlm's own, per adapted projection:
``{path}.adapter_down.weight`` ``[width, hidden]``, ``.adapter_down.bias`` ``[width]``,
``.adapter_up.weight`` ``[hidden, width]``, ``.adapter_up.bias`` ``[hidden]``, with
``width = hidden / reduction_factor``. A new user starts with ``down`` small random and ``up`` zero, i.e.
as the identity. The activation makes it impossible to fold into the base weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from tailorlm.kinds.kind import ModuleKind, ModuleSpecError

_ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}


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


class Bottleneck(ModuleKind):
    name = "bottleneck"
    spec_type = BottleneckSpec
    learning_rate = 1e-3

    def validate(self, spec: BottleneckSpec) -> None:
        if spec.reduction_factor < 1:
            raise ModuleSpecError("the bottleneck reduction factor must be >= 1")
        if spec.placement not in ("houlsby", "pfeiffer"):
            raise ModuleSpecError(f"bottleneck placement must be houlsby or pfeiffer, got {spec.placement!r}")
        if spec.activation not in _ACTIVATIONS:
            raise ModuleSpecError(f"bottleneck activation must be one of {sorted(_ACTIVATIONS)}")

    def targets(self, spec: BottleneckSpec) -> tuple[str, ...]:
        return spec.targets

    def linear_shapes(
        self, spec: BottleneckSpec, short_name: str, linear: nn.Linear
    ) -> dict[str, tuple[int, ...]]:
        hidden = linear.out_features
        width = max(1, hidden // spec.reduction_factor)
        return {
            "adapter_down.weight": (width, hidden),
            "adapter_down.bias": (width,),
            "adapter_up.weight": (hidden, width),
            "adapter_up.bias": (hidden,),
        }

    def tensor_name(self, spec: BottleneckSpec, path: str, suffix: str) -> str:
        return f"{path}.{suffix}"

    def init_user(self, suffix: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        if suffix != "adapter_down.weight":
            return super().init_user(suffix, tensor, generator)
        with torch.no_grad():
            tensor.normal_(0.0, 0.02, generator=generator)

    def apply_linear(
        self,
        spec: BottleneckSpec,
        short_name: str,
        base: nn.Linear,
        x: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
        slot_ids: torch.Tensor,
        training: bool,
    ) -> torch.Tensor:
        rows = {suffix: tensor.index_select(0, slot_ids) for suffix, tensor in stack.items()}
        out = base(x)  # [rows, positions, hidden], the base's dtype
        # The adapter in the module's dtype (fp32), its sum with the base output back in the base's.
        wide = out.to(rows["adapter_down.weight"].dtype)
        down = torch.baddbmm(
            rows["adapter_down.bias"].unsqueeze(1), wide, rows["adapter_down.weight"].transpose(1, 2)
        )  # [rows, positions, width]
        up = torch.baddbmm(
            rows["adapter_up.bias"].unsqueeze(1),
            _ACTIVATIONS[spec.activation](down),
            rows["adapter_up.weight"].transpose(1, 2),
        )
        return (wide + up).to(out.dtype)
