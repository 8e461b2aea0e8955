"""A bias over a task's labels: the smallest personal part there is, a few numbers per user added to the
shared model's label scores (HuBi-Simple's per-annotator bias, Kocon et al.), with the weight the user
gives the shared model. It changes no layer of the model: only the scores of ``Engine.score_choices``, so
it is served from a slot like any module and mixes with other users in one batch, but it cannot be
trained by the language-model loss (``methods.label_models`` fits it, a convex problem) and leaves free
generation as the shared model answers.

A user's label scores are ``scale * s + bias``, ``s`` ``[choices]`` the shared model's. Per user two
tensors: ``label_bias`` ``[len(labels)]`` in the order of ``spec.labels`` (a choice outside them gets no
bias), and ``label_scale`` ``[1]``. The identity is bias 0 and scale 1. The scale is what lets one kind
hold every personal label part of ``label_models``: a bias fitted against the shared model (scale 1),
the user's own label prior alone (scale 0, bias its log), or the two fused (scale ``w``, bias
``(1 - w)`` times the log prior). Files written before the scale existed load with scale 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tailorlm.kinds.kind import ModuleKind, ModuleSpecError

BIAS = "label_bias"
SCALE = "label_scale"


@dataclass(frozen=True)
class LabelBiasSpec:
    """The labels the bias is over, in the order of its tensor."""

    labels: tuple[str, ...] = ()
    kind: ClassVar[str] = "label-bias"


class LabelBias(ModuleKind):
    name = "label-bias"
    spec_type = LabelBiasSpec
    acts_on_model = False

    def validate(self, spec: LabelBiasSpec) -> None:
        if len(set(spec.labels)) != len(spec.labels) or not all(isinstance(x, str) for x in spec.labels):
            raise ModuleSpecError(f"a label bias needs distinct label strings, not {list(spec.labels)}")

    def for_labels(self, spec: LabelBiasSpec, labels: Sequence[str] | None) -> LabelBiasSpec:
        """A bias named without labels is over the task's; a task without labels cannot have one."""
        if spec.labels:
            return spec
        if not labels:
            raise ModuleSpecError("a label-bias module needs a task with a label set; this task has none")
        return LabelBiasSpec(tuple(labels))

    def choice_shapes(self, spec: LabelBiasSpec) -> dict[str, tuple[int, ...]]:
        return {BIAS: (len(spec.labels),), SCALE: (1,)}

    def identity_value(self, suffix: str) -> float:
        return 1.0 if suffix == SCALE else 0.0

    def normalize_names(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file written before ``label_scale`` existed holds the bias alone: its scale was 1."""
        found = dict(tensors)
        if BIAS in found and SCALE not in found:
            found[SCALE] = torch.ones(1, dtype=found[BIAS].dtype)
        return found

    def adjust_choices(
        self,
        spec: LabelBiasSpec,
        choices: Sequence[str],
        scores: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
        slot_ids: torch.Tensor,
    ) -> torch.Tensor:
        """``scores`` ``[rows, choices]`` times each row's user's scale, plus their bias on the choices it
        names (a choice outside ``spec.labels`` gets no bias)."""
        scale = stack[SCALE].index_select(0, slot_ids).to(scores.dtype)  # [rows, 1]
        adjusted = scores * scale
        position = {label: i for i, label in enumerate(spec.labels)}
        named = [position.get(choice) for choice in choices]
        columns = [j for j, p in enumerate(named) if p is not None]
        if columns:
            rows_bias = stack[BIAS].index_select(0, slot_ids)  # [rows, labels]
            adjusted[:, columns] += rows_bias[:, [named[j] for j in columns]].to(scores.dtype)
        return adjusted


def label_part(bias: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """One user's label-bias module: ``bias`` ``[labels]`` and the weight ``scale`` on the shared model."""
    return {BIAS: bias.detach().float(), SCALE: torch.tensor([float(scale)])}
