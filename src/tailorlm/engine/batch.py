"""Rows and batches: what one sequence of a mixed-user batch is, and how rows become tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100  # label of a position that is not learned or scored (torch's cross-entropy default)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, so a padded row sees the positions it would see alone."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


@dataclass(frozen=True)
class Row:
    """One sequence of a batch: a formatted prompt, the text to score or learn after it, and whose module
    (slot) it runs through. Slot 0 is the bare base model."""

    prompt: str
    target: str = ""
    slot: int = 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, length], left padded
    attention_mask: torch.Tensor  # [rows, length], 0 on padding
    labels: torch.Tensor  # [rows, length], IGNORE except on target tokens
    slot_ids: torch.Tensor  # [rows]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, end: int) -> Batch:
        """Rows ``start:end`` with the left padding none of them needs dropped: the batch ``encode_rows``
        makes of those rows alone."""
        width = int(self.attention_mask[start:end].sum(dim=1).max()) if end > start else 0
        cut = self.input_ids.shape[1] - width
        return Batch(
            self.input_ids[start:end, cut:],
            self.attention_mask[start:end, cut:],
            self.labels[start:end, cut:],
            self.slot_ids[start:end],
        )

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.slot_ids))
        )


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_rows(tokenizer, rows: Sequence[Row], max_length: int, end_target_with_eos: bool = True) -> Batch:
    """Tokenize rows, prompt and target separately so labels cover exactly the target tokens.

    A row longer than ``max_length`` loses the start of its prompt: the end (the item being asked) and
    the whole target are kept.
    """
    prompts = token_ids(tokenizer, [r.prompt for r in rows])
    targets = token_ids(tokenizer, [r.target for r in rows])
    eos = [tokenizer.eos_token_id] if end_target_with_eos else []
    sequences, label_rows = [], []
    for prompt_ids, target_ids, row in zip(prompts, targets, rows, strict=True):
        target_ids = (target_ids + eos) if row.target else []
        target_ids = target_ids[: max_length - 1]
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(target_ids) - max_length) :]
        sequences.append(prompt_ids + target_ids)
        label_rows.append([IGNORE] * len(prompt_ids) + target_ids)
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id

    def left_pad(values: list[int], fill: int) -> list[int]:
        return [fill] * (width - len(values)) + values

    return Batch(
        input_ids=torch.tensor([left_pad(s, pad) for s in sequences]),
        attention_mask=torch.tensor([left_pad([1] * len(s), 0) for s in sequences]),
        labels=torch.tensor([left_pad(labels, IGNORE) for labels in label_rows]),
        slot_ids=torch.tensor([r.slot for r in rows], dtype=torch.long),
    )
