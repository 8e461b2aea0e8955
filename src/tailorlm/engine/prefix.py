"""Shared prompt prefixes: which leading tokens a batch's rows can compute once and continue from.

Every training row of one user starts with the same system text and task instruction (71% of a verbagg
prompt's tokens, 91% on a task with a long instruction), and so do the items one user has scored. Rows
of one slot that begin with the same tokens get the same keys and values there, so the engine runs that
common start once per group (the prefix pass) and every row of the group continues from a copy of its
cache (the suffix pass). Both passes are ordinary decoder calls, gradients flow through the cached keys
and values into the bank, and the result equals running each row whole, up to float rounding.

This module only plans (pure Python on token lists); ``Engine`` runs the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tailorlm.engine.batch import IGNORE, Batch

# Sharing costs a second decoder call per batch (and a copy of the prefix cache per row): below this many
# saved positions the plain single pass is kept. On 2 CPU cores one more call of SmolLM2-135M costs
# ~80 ms and one more position ~1 ms (forward, 4 rows), so the break-even is ~70 positions; a shared
# verbagg instruction saves over a thousand per 16-row micro-batch.
MIN_SAVED_POSITIONS = 64


@dataclass(frozen=True)
class PrefixPlan:
    """How a batch splits into one prefix pass (a row per group) and one suffix pass (every row).

    A group is the rows of one slot; its prefix is their common leading tokens, at most up to (but not
    including) each row's last prompt token, so every position that predicts a target token, and the
    last prompt position that candidate labels continue from, runs in the suffix pass. Rows are left padded in
    both passes: the prefix pass is ``len(groups) x width`` positions, the suffix pass
    ``rows x suffix_width``.
    """

    group_of_row: tuple[int, ...]  # per row: its group's index
    representatives: tuple[int, ...]  # per group: the row whose first tokens are the prefix
    lengths: tuple[int, ...]  # per group: how many leading tokens its rows share

    @property
    def width(self) -> int:
        """Columns of the prefix pass (the longest prefix; shorter ones are left padded)."""
        return max(self.lengths)

    def row_lengths(self) -> list[int]:
        """Per row: how many of its leading tokens come from its group's prefix."""
        return [self.lengths[g] for g in self.group_of_row]

    def positions(self, row_lengths: Sequence[int]) -> tuple[int, int]:
        """Positions the model runs (padding included): (shared plan, one plain pass over the rows)."""
        suffix_width = max(n - p for n, p in zip(row_lengths, self.row_lengths(), strict=True))
        rows = len(row_lengths)
        return len(self.lengths) * self.width + rows * suffix_width, rows * max(row_lengths)


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``rows`` have in common."""
    first, length = rows[0], min(len(row) for row in rows)
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
    return length


def plan_prefixes(
    rows: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    groups: Sequence[int],
    min_saved: int = MIN_SAVED_POSITIONS,
) -> PrefixPlan | None:
    """The prefix/suffix split (one group per slot) that runs the fewest positions, or None when sharing
    saves fewer than ``min_saved`` positions over one plain pass.

    ``rows`` are the rows' tokens (no padding), ``prompt_lengths`` how many of them come before the first
    target token (a row without a target: all of them), ``groups`` which rows may share (their slots).

    Cost: with both passes left padded, the plan runs ``G * width + R * suffix_width`` positions (G groups,
    R rows). Every row must keep its own tokens from ``length - suffix_width`` on, so the narrowest
    suffix the caps allow, ``s = max over groups of (longest row - cap)``, fixes the prefix width at
    ``W - s`` and saves ``(R - G) * (W - s)`` over one pass of width ``W``; a wider suffix only saves
    less. Every group then shares as much as that width holds.
    """
    if not (len(rows) == len(prompt_lengths) == len(groups)) or not rows:
        raise ValueError("rows, prompt_lengths and groups must be non-empty and of equal length")
    keys = list(dict.fromkeys(groups))  # groups in order of first appearance
    members = {key: [r for r, g in enumerate(groups) if g == key] for key in keys}
    caps = []
    for key in keys:
        mine = [rows[r] for r in members[key]]
        # The last prompt token must stay in the suffix: it predicts the first target token (or is the
        # state a candidate label continues from); so must everything after it.
        last_prompt = min(max(0, min(prompt_lengths[r], len(rows[r])) - 1) for r in members[key])
        caps.append(min(common_prefix_length(mine), last_prompt))
    width = max(len(row) for row in rows)
    suffix_width = max(
        max(len(rows[r]) for r in members[key]) - cap for key, cap in zip(keys, caps, strict=True)
    )
    prefix_width = width - suffix_width
    if (len(rows) - len(keys)) * prefix_width < max(1, min_saved):
        return None
    index = {key: g for g, key in enumerate(keys)}
    return PrefixPlan(
        group_of_row=tuple(index[g] for g in groups),
        representatives=tuple(members[key][0] for key in keys),
        lengths=tuple(min(cap, prefix_width) for cap in caps),
    )


def plan_batch(batch: Batch, min_saved: int = MIN_SAVED_POSITIONS) -> PrefixPlan | None:
    """``plan_prefixes`` for an encoded batch, grouping rows by slot (slot 0's rows share too: they all
    run the bare model)."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    width = batch.input_ids.shape[1]
    ids = batch.input_ids.tolist()
    rows = [row[width - n :] for row, n in zip(ids, lengths, strict=True)]
    labelled = (batch.labels != IGNORE).int()
    # First labelled column (argmax finds the first 1), counted from the row's first real token.
    first = labelled.argmax(dim=1).tolist()
    has_target = labelled.any(dim=1).tolist()
    prompt_lengths = [f - (width - n) if t else n for f, n, t in zip(first, lengths, has_target, strict=True)]
    return plan_prefixes(rows, prompt_lengths, batch.slot_ids.tolist(), min_saved)


def prefix_tensors(
    batch: Batch, plan: PrefixPlan, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prefix pass's inputs and the suffix pass's token columns, on the batch's device.

    Returns ``prefix_ids`` and ``prefix_mask`` ``[groups, width]`` (each group's prefix, left padded),
    ``suffix_ids`` and ``suffix_mask`` ``[rows, suffix_width]``. Both passes are left padded, so a row's
    suffix occupies the batch's last ``suffix_width`` columns as they are: suffix column ``c`` is batch
    column ``W - suffix_width + c``. Columns there that belong to the row's prefix are masked (they are
    padding to this pass; their keys come from the prefix cache)."""
    device = batch.input_ids.device
    columns = batch.input_ids.shape[1]
    lengths = batch.attention_mask.sum(dim=1)  # [rows] real tokens per row
    representatives = torch.tensor(plan.representatives, device=device)
    shared = torch.tensor(plan.lengths, device=device)  # [groups]
    width = plan.width
    # Group g's prefix is its representative's tokens 0..shared[g]-1, at batch columns from
    # columns - lengths[rep] on; placed right-aligned in `width` columns.
    start = columns - lengths[representatives]  # [groups]
    arange = torch.arange(width, device=device)
    prefix_mask = arange[None, :] >= (width - shared)[:, None]  # [groups, width]
    source = (start + shared - width)[:, None] + arange[None, :]  # batch column of each prefix column
    prefix_ids = batch.input_ids[representatives].gather(1, source.clamp(0, columns - 1))
    prefix_ids = prefix_ids.masked_fill(~prefix_mask, pad_id)
    own = lengths - shared[torch.tensor(plan.group_of_row, device=device)]  # [rows] suffix tokens
    suffix_width = int(own.max())
    suffix_ids = batch.input_ids[:, columns - suffix_width :]
    suffix_mask = torch.arange(suffix_width, device=device)[None, :] >= (suffix_width - own)[:, None]
    mask_dtype = batch.attention_mask.dtype
    return prefix_ids, prefix_mask.to(mask_dtype), suffix_ids, suffix_mask.to(mask_dtype)
