"""Prompt tuning (Lester et al., 2021): ``virtual_tokens`` learned embeddings placed right before each
row's text. One tensor per user, ``prompt_embeddings`` ``[virtual_tokens, hidden]`` (PEFT's key); a new
user starts small random. Slot 0's rows keep the virtual positions masked out, so they run the bare
base model in the same batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from tailorlm.kinds.kind import ModuleKind, ModuleSpecError

EMBEDDINGS = "prompt_embeddings"


@dataclass(frozen=True)
class PromptSpec:
    """Virtual token embeddings placed right before each row's text."""

    virtual_tokens: int = 16
    kind: ClassVar[str] = "prompt"
    targets: tuple[str, ...] = field(default=(), init=False)


class Prompt(ModuleKind):
    name = "prompt"
    spec_type = PromptSpec
    peft_type = "PROMPT_TUNING"
    learning_rate = 3e-2
    starts_as_identity = False  # a new user's small random virtual tokens already change outputs

    def validate(self, spec: PromptSpec) -> None:
        if spec.virtual_tokens < 1:
            raise ModuleSpecError("prompt tuning needs at least one virtual token")

    def input_shapes(self, spec: PromptSpec, model: nn.Module) -> dict[str, tuple[int, ...]]:
        return {EMBEDDINGS: (spec.virtual_tokens, model.get_input_embeddings().embedding_dim)}

    def init_user(self, suffix: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        with torch.no_grad():
            tensor.normal_(0.0, 0.02, generator=generator)

    def model_inputs(
        self,
        spec: PromptSpec,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        slot_ids: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        prompts = stack[EMBEDDINGS].index_select(0, slot_ids)  # [rows, virtual, hidden]
        return insert_virtual(embeds, attention_mask, slot_ids, prompts)

    def peft_config(self, spec: PromptSpec, model: nn.Module, base_name: str | None) -> Any:
        from peft import PromptTuningConfig, TaskType

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

    def spec_from_peft(self, config: Mapping[str, Any]) -> PromptSpec:
        spec = PromptSpec(virtual_tokens=int(config["num_virtual_tokens"]))
        self.validate(spec)
        return spec


def insert_virtual(
    embeds: torch.Tensor, attention_mask: torch.Tensor, slot_ids: torch.Tensor, prompts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``embeds`` ``[rows, width, hidden]`` and ``attention_mask`` ``[rows, width]`` with row ``b``'s
    virtual token embeddings ``prompts[b]`` ``[rows, virtual, hidden]`` right before its first real
    token, and ``virtual``, the positions put in front. Rows of slot 0 keep the virtual positions masked
    out, so they run the bare base model in the same batch."""
    # Inside the left padding, so position ids (from the mask) are 0.. for the virtual tokens exactly as
    # in PEFT's unpadded layout. Positions masked out before (another kind's, for a row not its user's)
    # may be overwritten: nothing reads them.
    rows, virtual = prompts.shape[:2]
    width, hidden = embeds.shape[1:]
    embeds = torch.cat([embeds.new_zeros(rows, virtual, hidden), embeds], dim=1)
    mask = torch.cat([attention_mask.new_zeros(rows, virtual), attention_mask], dim=1)
    starts = width - attention_mask.sum(dim=1)
    positions = starts[:, None] + torch.arange(virtual, device=embeds.device)
    row_index = torch.arange(rows, device=embeds.device)[:, None].expand(rows, virtual)
    embeds = embeds.index_put((row_index, positions), prompts.to(embeds.dtype))
    personal = (slot_ids != 0).to(mask.dtype)[:, None].expand(rows, virtual)
    mask = mask.index_put((row_index, positions), personal)
    return embeds, mask, virtual
