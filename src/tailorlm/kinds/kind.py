"""What a module kind is: the small protocol every kind of per-user module implements.

A kind says which tensors one user owns and where (its layout), what slot 0 holds (the identity) and what
a new user starts from, how its term is applied to a batch whose rows belong to different users, how its
spec maps to and from a PEFT config, and how it folds into the base weights where it can. Generic code
(the slot bank, the engine, the module file format, the trainer, perf, setups and tests) only ever talks
to a kind through this class and the registry, never by naming a kind.

Tensor layout: every user's tensors for one site are stacked along a leading slot axis, ``[slots, ...]``.
A tensor's bank name is also its key on disk, so a slot slice saved as-is is a module file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


class ModuleSpec(Protocol):
    """A kind's settings: a frozen dataclass whose ``kind`` names its entry in the registry."""

    kind: ClassVar[str]


class ModuleSpecError(ValueError):
    """A module spec names projections the base model does not have, or has a value out of range."""


class ModuleKind:
    """One kind of per-user module. Subclasses set ``name`` and ``spec_type`` and override what applies.

    Two places a kind can act: on linear projections (``targets`` names them; ``linear_shapes`` and
    ``apply_linear``) and on the model's input embeddings (``input_shapes`` and ``model_inputs``; a kind
    whose users' inputs go through a part they share declares it in ``shared_shapes``).
    """

    name: ClassVar[str]
    spec_type: ClassVar[type]
    peft_type: ClassVar[str | None] = None  # PEFT's name for this kind, None when PEFT has no such kind
    # The learning rate the benchmark starts this kind at (the usual scale for the kind, see setups).
    learning_rate: ClassVar[float] = 1e-3
    # Whether a new user (``init_user``) gives exactly the base model's outputs, as PEFT's initialisations
    # do for LoRA (B = 0), IA3 (ones) and the bottleneck adapter (up = 0). Prompt tuning's fresh virtual
    # tokens are new context, so its new users already differ from the base. The contract tests hold
    # every kind to what it declares here, both ways.
    starts_as_identity: ClassVar[bool] = True
    # Whether the kind changes the model's outputs (its layers or inputs), so the language-model loss
    # trains it and every contract test over logits applies. A kind that only adjusts label scores
    # (``label_shapes``, ``adjust_label_scores``) sets this False.
    acts_on_model: ClassVar[bool] = True
    # How a user's own part of this kind is made from their data (``methods.personal.train_personal``
    # dispatches on it, so no generic code names a kind): "loss", trained by the language-model loss over
    # their examples, many users per step; "label-fit", fitted against the frozen shared model's label
    # scores on their labelled items (``methods.label_parts``); "fold-in", fitted in closed form from
    # their answers against what the task froze (``methods.collab``).
    made_by: ClassVar[str] = "loss"

    # ---- the spec ----------------------------------------------------------------------------------

    def validate(self, spec: Any) -> None:
        """Raise ``ModuleSpecError`` for a value out of range."""

    def targets(self, spec: Any) -> tuple[str, ...]:
        """Short names of the linear projections this kind adapts (empty: none)."""
        return ()

    def for_labels(self, spec: Any, labels: Sequence[str] | None) -> Any:
        """``spec`` for a task with ``labels`` (None: free text): a kind over the labels fills them in."""
        return spec

    def same_layout(self, a: Any, b: Any) -> bool:
        """Whether two specs give users tensors of the same names, shapes and meaning."""
        return a == b

    # ---- the layout ---------------------------------------------------------------------------------

    def linear_shapes(self, spec: Any, short_name: str, linear: nn.Linear) -> dict[str, tuple[int, ...]]:
        """Per-slot shapes of the tensors one user owns on one adapted projection, keyed by the suffix
        that follows the projection's path in the tensor's name."""
        raise ModuleSpecError(f"{self.name} modules do not adapt linear projections")

    def input_shapes(self, spec: Any, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """Per-slot shapes of tensors that act on the model's inputs, by name (empty: none)."""
        return {}

    def shared_shapes(self, spec: Any, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """Shapes of tensors every user of the bank shares (no slot axis), by name (empty: none): a part
        trained once for a task, beside the users' own (``model_inputs`` finds them in its ``stack``).
        They are not a user's module: never read, written or stored with one."""
        return {}

    def init_shared(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """A shared tensor's values before its task trains it (drawn from ``generator``, seeded the same
        for every bank, so two banks of one spec start alike)."""
        with torch.no_grad():
            tensor.zero_()

    def label_shapes(self, spec: Any) -> dict[str, tuple[int, ...]]:
        """Per-slot shapes of tensors that act on label scores (``adjust_label_scores``), by name (empty:
        none)."""
        return {}

    def tensor_name(self, spec: Any, path: str, suffix: str) -> str:
        """A linear site's tensor name in the bank and its key on disk: PEFT's keys by default."""
        return f"{PEFT_PREFIX}{path}.{suffix}"

    def identity_value(self, suffix: str) -> float:
        """What slot 0 (no personal module) holds in this tensor: every additive term zero."""
        return 0.0

    def init_user(self, suffix: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Fresh-user values for one slot's tensor (PEFT's defaults, so that a new module is the identity
        wherever the kind can start as one: see ``starts_as_identity``)."""
        with torch.no_grad():
            tensor.fill_(self.identity_value(suffix))

    # ---- applying it --------------------------------------------------------------------------------

    def apply_linear(
        self,
        spec: Any,
        short_name: str,
        base: nn.Linear,
        x: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
        slot_ids: torch.Tensor,
        training: bool,
    ) -> torch.Tensor:
        """The adapted projection for ``x`` ``[rows, positions, in]``, where row ``b`` uses slot
        ``slot_ids[b]`` of every tensor in ``stack`` (``[slots, ...]``, keyed by suffix). The base matmul
        runs once for the whole batch; each row adds its own user's term."""
        raise ModuleSpecError(f"{self.name} modules do not adapt linear projections")

    def model_inputs(
        self,
        spec: Any,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        slot_ids: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The input embeddings ``[rows, width, hidden]`` and mask ``[rows, width]`` with this kind's
        positions put in front of each row's text, and how many were put in front (dropped again from the
        outputs). By default unchanged. Row ``b``'s user is slot ``slot_ids[b]`` of ``stack`` (its
        ``input_shapes`` tensors ``[slots, ...]`` and its ``shared_shapes`` ones)."""
        return embeds, attention_mask, 0

    def adjust_label_scores(
        self,
        spec: Any,
        labels: Sequence[str],
        scores: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
        slot_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The summed log-probabilities ``scores`` ``[rows, labels]`` of the candidate ``labels`` as row
        ``b``'s user (slot ``slot_ids[b]`` of ``stack``) adjusts them. By default unchanged."""
        return scores

    def exact_when_shared(self, spec: Any) -> bool:
        """Whether training rows that share a prompt prefix may compute it once: true unless the kind
        draws randomness per position in training (then each row must draw its own)."""
        return True

    # ---- PEFT and merging ---------------------------------------------------------------------------

    def peft_config(self, spec: Any, model: nn.Module, base_name: str | None) -> Any | None:
        """The PEFT config object for ``spec`` on ``model``; None where PEFT has no such kind."""
        return None

    def spec_from_peft(self, config: Mapping[str, Any]) -> Any:
        """A spec from a PEFT ``adapter_config.json`` of this kind's ``peft_type``."""
        raise ModuleSpecError(f"PEFT has no {self.name} modules")

    def normalize_names(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensor names as another tool wrote them, mapped to this kind's bank names."""
        return dict(tensors)

    def merge_into_base(self, spec: Any, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> int:
        """Fold one user's module into the base weights; returns how many projections changed."""
        raise ModuleSpecError(
            f"a {self.name} module cannot be folded into the base weights; serve it from a slot instead"
        )

    @property
    def has_shared_part(self) -> bool:
        """Whether the kind's users share a trained part (``shared_shapes``) beside their own modules."""
        return type(self).shared_shapes is not ModuleKind.shared_shapes

    @property
    def mergeable(self) -> bool:
        return type(self).merge_into_base is not ModuleKind.merge_into_base

    # ---- serialising the spec -----------------------------------------------------------------------

    def spec_to_dict(self, spec: Any) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(spec).items() if spec.__dataclass_fields__[k].init}
        return {"kind": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}

    def spec_from_dict(self, data: Mapping[str, Any]) -> Any:
        allowed = {f for f, d in self.spec_type.__dataclass_fields__.items() if d.init}
        unknown = set(data) - allowed
        if unknown:
            raise ModuleSpecError(
                f"{self.name} module has no setting(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            spec = self.spec_type(**converted)
        except TypeError as error:
            raise ModuleSpecError(
                f"{self.name} module settings {dict(data)} are not valid: {error}"
            ) from error
        self.validate(spec)
        return spec


def names_list(value: Any) -> list[str]:
    """PEFT's ``target_modules`` as a list of names; a regex pattern cannot be turned into slots."""
    if isinstance(value, str):
        raise ModuleSpecError(
            f"target_modules given as a pattern ({value!r}); tailorlm needs a list of names"
        )
    return list(value)


def base_linear(model: nn.Module, path: str) -> nn.Linear:
    """The frozen base projection at ``path``, seen through the engine's slot wrapper where there is one
    (the wrapper keeps the projection it wraps as ``.base``)."""
    module = model.get_submodule(path)
    while not isinstance(module, nn.Linear) and isinstance(getattr(module, "base", None), nn.Module):
        module = module.base
    if not isinstance(module, nn.Linear):
        raise ModuleSpecError(f"{path} is not a linear projection")
    return module


def by_site(tensors: Mapping[str, torch.Tensor], marker: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group tensors named ``{PEFT_PREFIX}{path}.{marker}{rest}`` by projection path:
    ``{path: {marker + rest: tensor}}``."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        path, _, rest = name.removeprefix(PEFT_PREFIX).rpartition("." + marker)
        grouped.setdefault(path, {})[marker + rest] = value
    return grouped
