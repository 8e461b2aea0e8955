"""Collaborative tokens: what matrix factorisation knows about a user, put before the prompt as soft tokens
(after CoLLM, Zhang et al., 2023, which maps a trained MF model's embeddings into an LLM's token space).

A user's own part is their vector from matrix factorisation, ``collab_user`` ``[factors + 1]``: their
rating bias, then their factors (at most 1 KB: ``factors + 1 <= 256`` fp32 numbers). It is fitted from
their answers against the task's frozen item factors (fold-in, ``methods.collab``), so a new user gets
one without retraining anyone. A small MLP every user shares maps the vector to ``tokens`` soft token
embeddings, placed right before the row's text as prompt tuning places its own:

    tokens(u) = W2 gelu(W1 u + c1) + c2,   W1 ``[width, factors + 1]``, W2 ``[tokens * hidden, width]``

The MLP is the kind's shared part (``shared_shapes``), trained once per task with the shared model
frozen. Only the user's vector enters the model, not the item's factors: a request names no item, and the
model reads the item from its text, so an item nobody answered is no special case for it. Slot 0's rows
keep the virtual positions masked out and run the bare shared model. A new user (vector 0) is the
average user of the factorisation, which already changes the outputs: not an identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from tailorlm.kinds.kind import ModuleKind, ModuleSpecError
from tailorlm.kinds.prompt import insert_virtual

VECTOR = "collab_user"  # [factors + 1]: the user's bias, then their factors
IN_WEIGHT, IN_BIAS = "collab_in.weight", "collab_in.bias"  # [width, factors + 1], [width]
OUT_WEIGHT, OUT_BIAS = "collab_out.weight", "collab_out.bias"  # [tokens * hidden, width], [tokens * hidden]
MAX_USER_NUMBERS = 256  # 1 KB of fp32: the most a user's own part may hold


@dataclass(frozen=True)
class CollabSpec:
    """``factors`` of matrix factorisation per user (plus their bias), mapped by an MLP of ``width`` hidden
    units to ``tokens`` soft tokens."""

    factors: int = 16
    tokens: int = 2
    width: int = 64
    kind: ClassVar[str] = "collab"


class Collab(ModuleKind):
    name = "collab"
    spec_type = CollabSpec
    learning_rate = 1e-2
    starts_as_identity = False  # the average user's tokens are still context the text did not have
    made_by = "fold-in"

    def validate(self, spec: CollabSpec) -> None:
        if not 1 <= spec.factors + 1 <= MAX_USER_NUMBERS:
            raise ModuleSpecError(
                f"collab factors must be 1..{MAX_USER_NUMBERS - 1} (a user's part is at most 1 KB), "
                f"not {spec.factors}"
            )
        if spec.tokens < 1 or spec.width < 1:
            raise ModuleSpecError(f"collab needs at least one token and one hidden unit, not {spec}")

    def input_shapes(self, spec: CollabSpec, model: nn.Module) -> dict[str, tuple[int, ...]]:
        return {VECTOR: (spec.factors + 1,)}

    def shared_shapes(self, spec: CollabSpec, model: nn.Module) -> dict[str, tuple[int, ...]]:
        hidden = model.get_input_embeddings().embedding_dim
        numbers = spec.factors + 1
        return {
            IN_WEIGHT: (spec.width, numbers),
            IN_BIAS: (spec.width,),
            OUT_WEIGHT: (spec.tokens * hidden, spec.width),
            OUT_BIAS: (spec.tokens * hidden,),
        }

    def init_shared(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """``nn.Linear``'s uniform initialisation for the weights; the output scaled to the size of a
        token embedding (about 0.02 per number in SmolLM2), so the first tokens are plausible context."""
        with torch.no_grad():
            if name in (IN_BIAS, OUT_BIAS):
                tensor.zero_()
                return
            bound = 1.0 / tensor.shape[1] ** 0.5
            tensor.uniform_(-bound, bound, generator=generator)
            if name == OUT_WEIGHT:
                tensor.mul_(0.02 / bound)

    def tokens(
        self, spec: CollabSpec, users: torch.Tensor, stack: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """``users`` ``[rows, factors + 1]`` -> their soft tokens ``[rows, tokens, hidden]``, in fp32."""
        hidden = torch.nn.functional.gelu(users.float() @ stack[IN_WEIGHT].T + stack[IN_BIAS])
        flat = hidden @ stack[OUT_WEIGHT].T + stack[OUT_BIAS]  # [rows, tokens * hidden]
        return flat.view(users.shape[0], spec.tokens, -1)

    def model_inputs(
        self,
        spec: CollabSpec,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        slot_ids: torch.Tensor,
        stack: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        prompts = self.tokens(spec, stack[VECTOR].index_select(0, slot_ids), stack)
        return insert_virtual(embeds, attention_mask, slot_ids, prompts)
