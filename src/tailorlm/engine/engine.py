"""The engine: one frozen base model, a bank of user slots, and batches whose rows may each belong to a
different user, for scoring, training and generation alike."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch.nn import functional as F

from tailorlm.engine import batch as batching
from tailorlm.engine.bank import EngineError, SlotBank, SlotRouter
from tailorlm.engine.batch import IGNORE, Batch, Row, position_ids
from tailorlm.engine.generation import DecodeConfig, generate_from_inputs
from tailorlm.kinds import ModuleSpec
from tailorlm.models import BaseModel

__all__ = ["IGNORE", "Batch", "Engine", "EngineError", "Row", "position_ids"]


class Engine:
    """Many users' modules on one base model.

    ``slots`` is how many modules are resident at once (slot 0, the identity, included). The base model
    is modified in place (its adapted projections are wrapped), so give each engine its own base model.
    """

    def __init__(
        self,
        base: BaseModel,
        spec: ModuleSpec,
        slots: int = 9,
        max_length: int = 512,
        end_target_with_eos: bool = True,
    ) -> None:
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.spec = spec
        self.max_length = max_length
        self.end_target_with_eos = end_target_with_eos
        self.router = SlotRouter()
        self.bank = SlotBank(self.model, spec, slots, self.router)
        self.device = self.bank.device  # the base model's; every batch tensor is made there

    # ---- batches ---------------------------------------------------------------------------------

    def encode(self, rows: Sequence[Row]) -> Batch:
        """Rows as tensors on the model's device (``batch.encode``: labels on target tokens only, an
        over-long prompt loses its start)."""
        if not rows:
            raise EngineError("cannot encode an empty batch")
        for row in rows:
            if row.slot:
                self.bank.check_slot(row.slot)
        encoded = batching.encode(self.tokenizer, rows, self.max_length, self.end_target_with_eos)
        return encoded.to(self.device)

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return batching.token_ids(self.tokenizer, texts)

    # ---- forward ---------------------------------------------------------------------------------

    def _model_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, slot_ids: torch.Tensor
    ) -> tuple[dict, int]:
        """Inputs for the decoder and how many leading positions the kind inserted (virtual tokens)."""
        return self.bank.kind.model_inputs(
            self.spec, self.model, input_ids, attention_mask, slot_ids, self.bank.input_stack
        )

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Last hidden states aligned with ``batch.input_ids`` (virtual positions dropped)."""
        inputs, inserted = self._model_inputs(batch.input_ids, batch.attention_mask, batch.slot_ids)
        with self.router.route(batch.slot_ids):
            output = self.model.get_decoder()(
                **inputs, position_ids=position_ids(inputs["attention_mask"]), use_cache=False
            )
        return output.last_hidden_state[:, inserted:]

    def logits(self, batch: Batch) -> torch.Tensor:
        """Full logits at every position (for checks; training and scoring use ``token_nll``)."""
        return self.model.get_output_embeddings()(self.hidden_states(batch))

    def token_nll(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: summed negative log-likelihood of its target tokens, and how many there are.

        The vocabulary projection runs only at positions that predict a target token: with a 49k
        vocabulary it is a fifth of the forward cost and most of the memory.
        """
        hidden = self.hidden_states(batch)
        next_labels = batch.labels[:, 1:]
        rows, cols = (next_labels != IGNORE).nonzero(as_tuple=True)
        logits = self.model.get_output_embeddings()(hidden[rows, cols])
        nll = F.cross_entropy(logits.float(), next_labels[rows, cols], reduction="none")
        sums = nll.new_zeros(len(batch)).index_add(0, rows, nll)
        counts = torch.bincount(rows, minlength=len(batch))
        return sums, counts

    @torch.inference_mode()
    def score(self, rows: Sequence[Row], batch_size: int = 16) -> list[float]:
        """Summed log-probability of each row's target given its prompt (for choosing among labels)."""
        scores: list[float] = []
        for start in range(0, len(rows), batch_size):
            sums, _ = self.token_nll(self.encode(rows[start : start + batch_size]))
            scores.extend((-sums).tolist())
        return scores

    @torch.inference_mode()
    def score_choices(
        self, prompts: Sequence[str], slots: Sequence[int], choices: Sequence[str], batch_size: int = 16
    ) -> list[list[float]]:
        """For each prompt, the summed log-probability of every choice (end-of-sequence included, as in
        ``score``). The prompt runs once; every choice continues from its cached keys and values, so
        choosing among n labels costs about one forward pass instead of n."""
        if len(prompts) != len(slots):
            raise EngineError(f"{len(prompts)} prompts but {len(slots)} slots")
        if not choices:
            raise EngineError("no choices to score")
        eos = [self.tokenizer.eos_token_id] if self.end_target_with_eos else []
        choice_ids = [ids + eos for ids in self._token_ids(list(choices))]
        width = max(len(ids) for ids in choice_ids)
        pad = self.tokenizer.pad_token_id
        continuation = torch.tensor(
            [ids + [pad] * (width - len(ids)) for ids in choice_ids], device=self.device
        )
        continuation_mask = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids in choice_ids], device=self.device
        )
        scores: list[list[float]] = []
        for start in range(0, len(prompts), batch_size):
            rows = [
                Row(p, "", s)
                for p, s in zip(
                    prompts[start : start + batch_size], slots[start : start + batch_size], strict=True
                )
            ]
            totals = self._score_continuations(self.encode(rows), continuation, continuation_mask)
            scores.extend(totals.view(len(rows), len(choices)).tolist())
        return scores

    def _score_continuations(
        self, batch: Batch, continuation: torch.Tensor, continuation_mask: torch.Tensor
    ) -> torch.Tensor:
        choices, width = continuation.shape
        rows = len(batch)
        inputs, _ = self._model_inputs(batch.input_ids, batch.attention_mask, batch.slot_ids)
        mask = inputs["attention_mask"]
        decoder = self.model.get_decoder()
        with self.router.route(batch.slot_ids):
            prefix = decoder(**inputs, position_ids=position_ids(mask), use_cache=True)
        cache = prefix.past_key_values
        cache.batch_repeat_interleave(choices)  # row b * choices + j continues prompt b with choice j
        expanded_slots = batch.slot_ids.repeat_interleave(choices)
        token_mask = continuation_mask.repeat(rows, 1)
        positions = mask.sum(1).repeat_interleave(choices)[:, None] + torch.arange(width, device=self.device)
        with self.router.route(expanded_slots):
            tail = decoder(
                input_ids=continuation.repeat(rows, 1),
                attention_mask=torch.cat([mask.repeat_interleave(choices, 0), token_mask], dim=1),
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        # Token k of a choice is predicted by the prompt's last state (k = 0) or the choice's token k - 1.
        last = prefix.last_hidden_state[:, -1].repeat_interleave(choices, 0)[:, None]
        predicting = torch.cat([last, tail.last_hidden_state[:, :-1]], dim=1)
        row_index, column = token_mask.nonzero(as_tuple=True)
        logits = self.model.get_output_embeddings()(predicting[row_index, column]).float()
        targets = continuation.repeat(rows, 1)[row_index, column]
        log_probs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        return log_probs.new_zeros(rows * choices).index_add(0, row_index, log_probs)

    # ---- generation ------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        slots: Sequence[int],
        decode: DecodeConfig | None = None,
        batch_size: int = 16,
    ) -> list[str]:
        """Continue each prompt through its own slot's module; rows of different users share batches."""
        if len(prompts) != len(slots):
            raise EngineError(f"{len(prompts)} prompts but {len(slots)} slots")
        decode = decode or DecodeConfig()
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = [
                Row(prompt, "", slot)
                for prompt, slot in zip(
                    prompts[start : start + batch_size], slots[start : start + batch_size], strict=True
                )
            ]
            batch = self.encode(chunk)
            inputs, _ = self._model_inputs(batch.input_ids, batch.attention_mask, batch.slot_ids)
            with self.router.route(batch.slot_ids):
                texts.extend(generate_from_inputs(self.model, self.tokenizer, inputs, decode))
        return texts

    # ---- modes -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Bank tensors take gradients and module dropout is on; the base model stays frozen in eval."""
        self.bank.trainable(True)
        try:
            yield
        finally:
            self.bank.trainable(False)
