"""A bias over a task's labels: the smallest personal part there is, a few numbers per user added to the
shared model's label scores (HuBi-Simple's per-annotator bias, Kocon et al.). It changes no layer of the
model: only the scores of ``Engine.score_choices`` for the labels it names, so it is served from a slot
like any module and mixes with other users in one batch, but it cannot be trained by the language-model
loss (``methods.label_models`` fits it, a convex problem) and leaves free generation as the shared model
answers.

Per user one tensor ``label_bias`` ``[len(labels)]``, in the order of ``spec.labels``. The identity is 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tailorlm.kinds.kind import ModuleKind, ModuleSpecError

BIAS = "label_bias"


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
        return {BIAS: (len(spec.labels),)}

    def adjust_choices(
        self,
        spec: LabelBiasSpec,
        choices: Sequence[str],
        scores: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
        slot_ids: torch.Tensor,
    ) -> torch.Tensor:
        """``scores`` ``[rows, choices]`` plus each row's user's bias on the choices it names (a choice
        outside ``spec.labels`` gets nothing)."""
        position = {label: i for i, label in enumerate(spec.labels)}
        named = [position.get(choice) for choice in choices]
        columns = [j for j, p in enumerate(named) if p is not None]
        if not columns:
            return scores
        rows_bias = stack[BIAS].index_select(0, slot_ids)  # [rows, labels]
        picked = rows_bias[:, [named[j] for j in columns]].to(scores.dtype)
        adjusted = scores.clone()
        adjusted[:, columns] += picked
        return adjusted
