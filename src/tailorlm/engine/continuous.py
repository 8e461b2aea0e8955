"""Iteration-level (continuous) batching: rows join a running batch between decode steps and leave it
the step they finish, each row on its own user's slot and with its own sampling settings.

The running batch is one left-padded key/value cache ``[rows, heads, columns, dim]`` per layer and one
attention mask ``[rows, columns]``. New rows are prefilled together (through the engine, so prompt
tuning's virtual tokens and every bank's terms apply), then their cache is padded on the left to the
running width and appended; rows that finish are dropped and columns nobody attends to any more are cut
from the left. A row's positions come from its own mask, so its numbers are those it would get decoded
alone, up to float rounding.

Not thread-safe: one scheduler thread owns a running batch and its engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from tailorlm.engine.bank import EngineError
from tailorlm.engine.batch import position_ids
from tailorlm.engine.engine import Engine

SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class Sampling:
    """One row's decoding settings. ``temperature`` 0 is greedy; ``seed`` None draws from the OS."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # run to max_new_tokens (load tests: every contender does the same work)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be between 0 and 2, not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], not {self.seed}")


@dataclass
class DecodeRow:
    """One sequence being generated: its prompt's token ids, global slot and settings."""

    prompt_ids: list[int]
    slot: int
    sampling: Sampling = field(default_factory=Sampling)
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish_reason: str | None = None  # "stop" (end of sequence), "length" or "error"; set when it ends
    generator: torch.Generator | None = None
    error: Exception | None = None  # why this row alone failed (finish_reason "error")

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise EngineError("a row to decode needs at least one prompt token")
        if self.sampling.temperature > 0:
            self.generator = torch.Generator()
            if self.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.sampling.seed)


def choose_tokens(logits: torch.Tensor, rows: Sequence[DecodeRow]) -> list[int | Exception]:
    """[rows, vocab] next-token logits -> one token per row under each row's own settings, or the error
    that row alone met (the other rows keep their tokens)."""
    chosen: list[int | Exception] = list(logits.argmax(dim=-1).tolist())
    for index, row in enumerate(rows):
        if row.sampling.temperature > 0:
            try:
                chosen[index] = _sample(logits[index].float(), row.sampling, row.generator)
            except Exception as error:  # e.g. a module that made this row's logits NaN
                chosen[index] = error
    return chosen


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    # The largest logit is subtracted before dividing, in float64 (which holds every positive float a
    # request can carry): every scaled value is then <= 0, so no temperature, however small, makes an inf
    # (whose softmax is NaN); the best token keeps weight 1.
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / sampling.temperature, dim=-1).cpu()
    if sampling.top_p < 1.0:
        # Nucleus: keep the most likely tokens whose mass before them is under top_p; the first always,
        # whatever top_p is (a top_p below float32's resolution would otherwise keep nothing).
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(0) - ordered
        drop = before >= sampling.top_p
        drop[0] = False
        ordered[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    if not torch.isfinite(probs).all():
        raise EngineError("the next-token distribution is not finite (NaN or inf logits)")
    return int(torch.multinomial(probs, 1, generator=generator))


class RunningBatch:
    """The rows being generated together on one engine. ``add`` prefills new rows and returns their
    first tokens; ``step`` advances every row by one token; a finished row is dropped in the same call
    that produced its last token."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: list[DecodeRow] = []
        self._cache = None  # the transformers cache of every row, left-padded to one width
        self._mask: torch.Tensor | None = None  # [rows, columns]
        self._eos = engine.tokenizer.eos_token_id

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        return 0 if self._mask is None else self._mask.shape[1]

    @torch.inference_mode()
    def add(self, rows: Sequence[DecodeRow]) -> list[tuple[DecodeRow, int]]:
        """Prefill ``rows`` together, join them to the batch, and return each one's first token."""
        if not rows:
            return []
        engine = self.engine
        for row in rows:
            engine.check_slot(row.slot)
        width = max(len(row.prompt_ids) for row in rows)
        pad = engine.tokenizer.pad_token_id
        ids = torch.tensor(
            [[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=engine.device
        )
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=engine.device
        )
        slots = torch.tensor([row.slot for row in rows], device=engine.device)
        inputs, _ = engine._model_inputs(ids, mask, slots)
        full_mask = inputs["attention_mask"]  # [new rows, inserted + width]
        output = engine._decode(slots, **inputs, position_ids=position_ids(full_mask), use_cache=True)
        logits = engine.model.get_output_embeddings()(output.last_hidden_state[:, -1])
        self._join(output.past_key_values, full_mask)
        self.rows.extend(rows)
        return self._advance(list(rows), logits)

    @torch.inference_mode()
    def step(self) -> list[tuple[DecodeRow, int]]:
        """One decode step for every row: each row's next token."""
        if not self.rows:
            return []
        engine = self.engine
        last = torch.tensor([[row.tokens[-1]] for row in self.rows], device=engine.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=1)
        slots = torch.tensor([row.slot for row in self.rows], device=engine.device)
        output = engine._decode(
            slots,
            input_ids=last,
            attention_mask=self._mask,
            position_ids=position_ids(self._mask)[:, -1:],
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache = output.past_key_values
        logits = engine.model.get_output_embeddings()(output.last_hidden_state[:, -1])
        return self._advance(list(self.rows), logits)

    def _advance(self, rows: list[DecodeRow], logits: torch.Tensor) -> list[tuple[DecodeRow, int]]:
        """Append each row's chosen token, mark rows that ended, and drop them from the batch. A row whose
        token could not be chosen ends alone with ``finish_reason`` "error" (its token is -1)."""
        produced = []
        for row, token in zip(rows, choose_tokens(logits, rows), strict=True):
            if isinstance(token, Exception):
                row.finish_reason, row.error = "error", token
                produced.append((row, -1))
                continue
            row.tokens.append(token)
            if token == self._eos and not row.sampling.ignore_eos:
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.sampling.max_new_tokens:
                row.finish_reason = "length"
            produced.append((row, token))
        self.drop([row for row in rows if row.finish_reason])
        return produced

    def drop(self, rows: Sequence[DecodeRow]) -> None:
        """Take ``rows`` out of the batch (finished, stopped by a stop string, or cancelled)."""
        gone = {id(row) for row in rows}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.engine.device)
        self._mask = self._mask[index]
        # Columns no remaining row attends to (the dropped rows' longer prompts) are cut from the left.
        first = int(self._mask.any(dim=0).nonzero()[0])
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def _join(self, cache, mask: torch.Tensor) -> None:
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self.columns, mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, columns, dim] -> [rows, heads, width, dim] with zeros in front."""
    return F.pad(states, (0, 0, width - states.shape[2], 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[1], 0))
