"""A bias over a task's labels: the smallest personal part there is, a few numbers per user added to the
shared model's label scores (HuBi-Simple's per-annotator bias, Kocon et al.), with the weight the user
gives the shared model. It changes no layer of the model: only the scores of ``Engine.score_labels``, so
it is served from a slot like any module and mixes with other users in one batch, but it cannot be
trained by the language-model loss (``methods.label_parts`` fits it, a convex problem) and leaves free
generation as the shared model answers.

A user's label scores are ``weight * s + bias``, ``s`` ``[labels]`` the shared model's. Per user two
tensors: ``label_bias`` ``[len(labels)]`` in the order of ``spec.labels`` (a candidate label outside them
gets no bias), and ``label_weight`` ``[1]``. The identity is bias 0 and weight 1. The weight is what lets
one kind hold every personal label part of ``label_parts``: a bias fitted against the shared model
(weight 1), the user's own label prior alone (weight 0, bias its log), or the two fused (weight ``weight``,
bias ``(1 - weight)`` times the log prior). Files written before the weight existed load with weight 1;
files that call it ``label_scale`` (its earlier name) load under its name now.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tailorlm.kinds.kind import ModuleKind, ModuleSpecError

BIAS = "label_bias"
WEIGHT = "label_weight"
OLD_WEIGHT = "label_scale"  # its name in files written before the rename


@dataclass(frozen=True)
class LabelBiasSpec:
    """The labels the bias is over, in the order of its tensor."""

    labels: tuple[str, ...] = ()
    kind: ClassVar[str] = "label-bias"


class LabelBias(ModuleKind):
    name = "label-bias"
    spec_type = LabelBiasSpec
    acts_on_model = False
    made_by = "label-fit"

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

    def label_shapes(self, spec: LabelBiasSpec) -> dict[str, tuple[int, ...]]:
        return {BIAS: (len(spec.labels),), WEIGHT: (1,)}

    def identity_value(self, suffix: str) -> float:
        return 1.0 if suffix == WEIGHT else 0.0

    def normalize_names(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file written before ``label_weight`` existed holds the bias alone (its weight was 1), or names
        the weight ``label_scale``."""
        found = dict(tensors)
        if OLD_WEIGHT in found and WEIGHT not in found:
            found[WEIGHT] = found.pop(OLD_WEIGHT)
        if BIAS in found and WEIGHT not in found:
            found[WEIGHT] = torch.ones(1, dtype=found[BIAS].dtype)
        return found

    def adjust_label_scores(
        self,
        spec: LabelBiasSpec,
        labels: Sequence[str],
        scores: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
        slot_ids: torch.Tensor,
    ) -> torch.Tensor:
        """``scores`` ``[rows, labels]`` times each row's user's weight, plus their bias on the labels it
        names (a candidate label outside ``spec.labels`` gets no bias)."""
        weight = stack[WEIGHT].index_select(0, slot_ids).to(scores.dtype)  # [rows, 1]
        adjusted = scores * weight
        position = {label: i for i, label in enumerate(spec.labels)}
        named = [position.get(label) for label in labels]
        columns = [j for j, p in enumerate(named) if p is not None]
        if columns:
            rows_bias = stack[BIAS].index_select(0, slot_ids)  # [rows, labels]
            adjusted[:, columns] += rows_bias[:, [named[j] for j in columns]].to(scores.dtype)
        return adjusted


def label_part(bias: torch.Tensor, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """One user's label-bias module: ``bias`` ``[labels]`` and the ``weight`` it gives the shared model."""
    return {BIAS: bias.detach().float(), WEIGHT: torch.tensor([float(weight)])}
