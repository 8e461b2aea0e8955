"""The engine: one frozen base model, a bank of user slots, and batches whose rows may each belong to a
different user, for scoring, training and generation alike."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from tailorlm.engine.bank import EngineError, SlotBank, SlotRouter, SlotSpace
from tailorlm.engine.batch import IGNORE, Batch, Row, encode_rows, position_ids, token_ids
from tailorlm.engine.generation import DecodeConfig, generate_from_inputs
from tailorlm.engine.prefix import PrefixPlan, plan_batch, prefix_tensors
from tailorlm.kinds import ModuleSpec
from tailorlm.models import BaseModel

if TYPE_CHECKING:
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import BaseModelOutputWithPast

__all__ = ["IGNORE", "Batch", "Engine", "EngineError", "Row", "position_ids"]


@dataclass
class _Run:
    """A batch run through the decoder, whole or as shared prefixes plus suffixes."""

    hidden: torch.Tensor  # [rows, columns, hidden]: states of the batch's LAST `columns` token columns
    mask: torch.Tensor  # [rows, cached]: attention mask over every position held in `cache`
    cache: Cache | None  # keys and values of every position run (None unless asked for)


# Scoring candidate labels: the key/value positions a part of the labels may hold at once ([rows * part,
# heads, prompt + width, dim] per layer), and the token positions whose vocabulary logits exist at once.
LABEL_POSITIONS = 4096
LOGIT_ROWS = 256


def labels_per_part(rows: int, prompt_columns: int, width: int) -> int:
    """How many labels continue ``rows`` prompts of ``prompt_columns`` cached columns together."""
    return max(1, LABEL_POSITIONS // (rows * (prompt_columns + width)))


def label_memory(config, dtype: torch.dtype, rows: int, prompt_tokens: int, count: int, width: int) -> int:
    """An upper bound, in bytes, of the tensors scoring ``count`` labels of at most ``width`` tokens
    after ``rows`` prompts of at most ``prompt_tokens`` tokens allocates beyond the model's weights, for a
    decoder of ``config`` (a transformers config) in ``dtype``. Counted: the prompts' pass (its keys and
    values, and the widest layer's activations), one part of the labels (its copy of the keys and values,
    its activations and attention scores, as ``labels_per_part`` sizes it), and one piece of logits.
    Doubled for what the allocator holds beside (freed blocks not yet reused, temporaries of one op)."""
    size = torch.finfo(dtype).bits // 8
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv_position = layers * 2 * kv_heads * head_dim * size  # bytes of keys and values per position
    widest = max(config.hidden_size * 4, config.intermediate_size * 3) * size  # per position, one layer
    prompt = rows * prompt_tokens * (kv_position + widest)
    part = min(count, labels_per_part(rows, prompt_tokens, width))
    sequences = rows * part
    columns = prompt_tokens + width
    tail = sequences * (
        columns * kv_position  # the part's copy of the cache, the prompt's columns and its own
        + width * widest
        + heads * width * columns * 4  # attention scores, in float
        + width * config.hidden_size * size * 2  # the predicting states and their selection
    )
    logits = min(LOGIT_ROWS, sequences * width) * config.vocab_size * 4 * 3  # logits, log-softmax, float
    return 2 * (prompt + tail + logits)


class Engine:
    """Many users' modules on one base model.

    ``slots`` is how many modules are resident at once (slot 0, the identity, included). The base model
    is modified in place (its adapted projections are wrapped), so give each engine its own base model.

    With ``share_prefix`` (the default), rows of one slot that start with the same tokens (one user's
    system text and instruction) run that start once per batch and continue from its cached keys and
    values, in training (``token_nll``) and scoring alike; see ``tailorlm.engine.prefix``. The result
    equals running every row whole up to float rounding. ``positions_run`` counts the token positions
    (padding included) the decoder has run, for measuring what sharing saves.
    """

    def __init__(
        self,
        base: BaseModel,
        spec: ModuleSpec | Sequence[ModuleSpec],
        slots: int | Sequence[int] = 9,
        max_length: int = 512,
        end_target_with_eos: bool = True,
        share_prefix: bool = True,
    ) -> None:
        specs = [spec] if not isinstance(spec, Sequence) else list(spec)
        counts = [slots] * len(specs) if isinstance(slots, int) else list(slots)
        if not specs or len(counts) != len(specs):
            raise EngineError(f"{len(specs)} module specs but {len(counts)} slot counts")
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.specs = specs
        self.spec = specs[0]
        self.max_length = max_length
        self.end_target_with_eos = end_target_with_eos
        self.share_prefix = share_prefix
        self.positions_run = 0
        routers: list[SlotRouter] = []
        banks: list[SlotBank] = []
        for one_spec, count in zip(specs, counts, strict=True):
            routers.append(SlotRouter())
            banks.append(SlotBank(self.model, one_spec, count, routers[-1], siblings=routers[:-1]))
        # The banks that put positions before the text (prompt tuning, collaborative tokens), in order.
        self._input_banks = [i for i, bank in enumerate(banks) if bank.input_stack]
        self.banks = banks
        self.bank = banks[0]  # the bank of a single-kind engine (training, the benchmark)
        self.space = SlotSpace(banks, routers)
        self.device = self.bank.device  # the base model's; every batch tensor is made there

    def single_bank(self) -> SlotBank:
        """The engine's one bank, for what trains a single kind (the trainers); an EngineError for an
        engine of several kinds, whose other banks a trainer would silently leave untrained."""
        if len(self.banks) > 1:
            kinds = ", ".join(bank.spec.kind for bank in self.banks)
            raise EngineError(
                f"this engine holds {len(self.banks)} kinds ({kinds}); training takes an engine of one kind"
            )
        return self.bank

    def check_slot(self, slot: int) -> None:
        """``slot`` is 0 (no module) or a user slot of one of the banks (global numbering)."""
        if slot:
            self.space.locate(slot)

    # ---- batches ---------------------------------------------------------------------------------

    def encode(self, rows: Sequence[Row]) -> Batch:
        """Rows as tensors on the model's device (``batch.encode_rows``: labels on target tokens only, an
        over-long prompt loses its start)."""
        if not rows:
            raise EngineError("cannot encode an empty batch")
        for row in rows:
            self.check_slot(row.slot)
        encoded = encode_rows(self.tokenizer, rows, self.max_length, self.end_target_with_eos)
        return encoded.to(self.device)

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return token_ids(self.tokenizer, texts)

    # ---- forward ---------------------------------------------------------------------------------

    def _model_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, slot_ids: torch.Tensor
    ) -> tuple[dict, int]:
        """Inputs for the decoder and how many leading positions the kinds inserted (virtual tokens).
        Each bank that inserts puts its block in front; a row's user belongs to one bank, so every other
        bank's block is masked out for it."""
        if not self._input_banks:
            return {"input_ids": input_ids, "attention_mask": attention_mask}, 0
        embeds, mask, inserted = self.model.get_input_embeddings()(input_ids), attention_mask, 0
        for index in self._input_banks:
            bank = self.banks[index]
            local = self.space.local_ids(index, slot_ids)
            embeds, mask, count = bank.kind.model_inputs(bank.spec, embeds, mask, local, bank.input_stack)
            inserted += count
        return {"inputs_embeds": embeds, "attention_mask": mask}, inserted

    def _decode(self, slot_ids: torch.Tensor, **inputs: object) -> BaseModelOutputWithPast:
        """One decoder call with every row routed to its slot; counts the positions it runs."""
        tokens = inputs.get("input_ids")
        tokens = inputs["inputs_embeds"] if tokens is None else tokens
        self.positions_run += tokens.shape[0] * tokens.shape[1]
        with self.space.route(slot_ids):
            return self.model.get_decoder()(**inputs)

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Last hidden states aligned with ``batch.input_ids`` (virtual positions dropped). Always one
        plain pass: every position's state is wanted, so nothing can be left to a shared prefix."""
        inputs, inserted = self._model_inputs(batch.input_ids, batch.attention_mask, batch.slot_ids)
        output = self._decode(
            batch.slot_ids, **inputs, position_ids=position_ids(inputs["attention_mask"]), use_cache=False
        )
        return output.last_hidden_state[:, inserted:]

    def _run(self, batch: Batch, use_cache: bool) -> _Run:
        """The batch through the decoder: in one plain pass, or, when rows of one slot share enough
        leading tokens, as a prefix pass (once per slot) and a suffix pass (every row) continuing from it.
        Either way ``hidden`` holds every state from each row's last prompt token on."""
        plan = plan_batch(batch) if self._may_share() else None
        if plan is None:
            inputs, inserted = self._model_inputs(batch.input_ids, batch.attention_mask, batch.slot_ids)
            mask = inputs["attention_mask"]
            output = self._decode(
                batch.slot_ids, **inputs, position_ids=position_ids(mask), use_cache=use_cache
            )
            cache = output.past_key_values if use_cache else None
            return _Run(output.last_hidden_state[:, inserted:], mask, cache)
        return self._run_shared(batch, plan)

    def _may_share(self) -> bool:
        # A kind whose training is random per position (LoRA dropout) would share one draw among the
        # rows that share a prefix: not the computation the rows would get alone, so it runs plainly.
        return self.share_prefix and all(
            bank.kind.exact_when_shared(bank.spec)
            for bank in self.banks
            if any(t.requires_grad for t in (*bank.tensors.values(), *bank.shared.values()))
        )

    def _run_shared(self, batch: Batch, plan: PrefixPlan) -> _Run:
        prefix_ids, prefix_mask, suffix_ids, suffix_mask = prefix_tensors(
            batch, plan, self.tokenizer.pad_token_id
        )
        group_of_row = torch.tensor(plan.group_of_row, device=self.device)  # [rows]
        group_slots = batch.slot_ids[torch.tensor(plan.representatives, device=self.device)]  # [groups]
        # The prefix goes through the kind's inputs, so inserted positions (prompt tuning's virtual
        # tokens) sit in front of it once per group; the suffix tokens continue the sequence as plain
        # ids, as labels and generated tokens do.
        inputs, _ = self._model_inputs(prefix_ids, prefix_mask, group_slots)
        group_mask = inputs["attention_mask"]  # [groups, inserted + width]
        prefix = self._decode(group_slots, **inputs, position_ids=position_ids(group_mask), use_cache=True)
        cache = prefix.past_key_values
        # Each row continues from its group's keys and values ([groups, heads, cached, dim] ->
        # [rows, ...]); the indexing stays in the autograd graph, so the prefix's gradient is the sum of
        # its rows', exactly as if each row had run it.
        cache.batch_select_indices(group_of_row)
        mask = torch.cat([group_mask[group_of_row], suffix_mask], dim=1)  # [rows, cached + suffix]
        suffix = self._decode(
            batch.slot_ids,
            input_ids=suffix_ids,
            attention_mask=mask,
            position_ids=position_ids(mask)[:, -suffix_ids.shape[1] :],
            past_key_values=cache,
            use_cache=True,
        )
        return _Run(suffix.last_hidden_state, mask, cache)

    def logits(self, batch: Batch) -> torch.Tensor:
        """Full logits at every position (for checks; training and scoring use ``token_nll``)."""
        return self.model.get_output_embeddings()(self.hidden_states(batch))

    def token_nll(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: summed negative log-likelihood of its target tokens, and how many there are.

        The vocabulary projection runs only at positions that predict a target token: with a 49k
        vocabulary it is a fifth of the forward cost and most of the memory.
        """
        run = self._run(batch, use_cache=False)
        offset = batch.input_ids.shape[1] - run.hidden.shape[1]  # batch column of run.hidden[:, 0]
        next_labels = batch.labels[:, 1:]
        rows, cols = (next_labels != IGNORE).nonzero(as_tuple=True)
        logits = self.model.get_output_embeddings()(run.hidden[rows, cols - offset])
        nll = F.cross_entropy(logits.float(), next_labels[rows, cols], reduction="none")
        sums = nll.new_zeros(len(batch)).index_add(0, rows, nll)
        counts = torch.bincount(rows, minlength=len(batch))
        return sums, counts

    def _by_slot(self, slots: Sequence[int]) -> list[int]:
        """An order that puts each slot's rows next to each other (stable), so batches hold whole users
        and their prompts can share a prefix; the identity order when nothing is shared."""
        order = list(range(len(slots)))
        return sorted(order, key=slots.__getitem__) if self.share_prefix else order

    @torch.inference_mode()
    def score(self, rows: Sequence[Row], batch_size: int = 16) -> list[float]:
        """Summed log-probability of each row's target given its prompt (for choosing among labels)."""
        order = self._by_slot([row.slot for row in rows])
        scores = [0.0] * len(rows)
        for start in range(0, len(rows), batch_size):
            chunk = order[start : start + batch_size]
            sums, _ = self.token_nll(self.encode([rows[i] for i in chunk]))
            for i, value in zip(chunk, (-sums).tolist(), strict=True):
                scores[i] = value
        return scores

    @torch.inference_mode()
    def score_labels(
        self, prompts: Sequence[str], slots: Sequence[int], labels: Sequence[str], batch_size: int = 16
    ) -> list[list[float]]:
        """For each prompt, the summed log-probability of every label (end-of-sequence included, as in
        ``score``). The prompt runs once; every label continues from its cached keys and values, so
        choosing among n labels costs about one forward pass instead of n. With ``share_prefix`` the
        prompts of one slot are batched together and their common start runs once too: a prefix per
        user, then each prompt's own tokens, then the labels."""
        if len(prompts) != len(slots):
            raise EngineError(f"{len(prompts)} prompts but {len(slots)} slots")
        continuation = self._continuations(labels)  # tokenized once for every batch
        order = self._by_slot(slots)
        scores: list[list[float]] = [[] for _ in prompts]
        for start in range(0, len(prompts), batch_size):
            chunk = order[start : start + batch_size]
            totals = self._label_scores(
                [prompts[i] for i in chunk], [slots[i] for i in chunk], labels, continuation
            )
            for i, values in zip(chunk, totals.tolist(), strict=True):
                scores[i] = values
        return scores

    def label_scores(
        self, prompts: Sequence[str], slots: Sequence[int], labels: Sequence[str]
    ) -> torch.Tensor:
        """``score_labels`` of one batch as a tensor ``[prompts, labels]`` that keeps its graph: inside
        ``training()`` the gradient of a loss over label scores reaches the rows' slots (a model trained
        to choose among labels, ``train.joint``)."""
        return self._label_scores(prompts, slots, labels, self._continuations(labels))

    def _continuations(self, labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The labels' token ids (end-of-sequence appended when targets end with it), right padded, and
        their mask: two ``[labels, longest]`` tensors."""
        if not labels:
            raise EngineError("no labels to score")
        eos = [self.tokenizer.eos_token_id] if self.end_target_with_eos else []
        label_ids = [ids + eos for ids in self._token_ids(list(labels))]
        width = max(len(ids) for ids in label_ids)
        pad = self.tokenizer.pad_token_id
        continuation = torch.tensor(
            [ids + [pad] * (width - len(ids)) for ids in label_ids], device=self.device
        )
        continuation_mask = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids in label_ids], device=self.device
        )
        return continuation, continuation_mask

    def _label_scores(
        self,
        prompts: Sequence[str],
        slots: Sequence[int],
        labels: Sequence[str],
        continuation: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        batch = self.encode([Row(prompt, "", slot) for prompt, slot in zip(prompts, slots, strict=True)])
        totals = self._score_continuations(batch, *continuation)
        return self._adjust_label_scores(labels, totals.view(len(prompts), len(labels)), batch.slot_ids)

    def _adjust_label_scores(
        self, labels: Sequence[str], scores: torch.Tensor, slot_ids: torch.Tensor
    ) -> torch.Tensor:
        """``scores`` ``[rows, labels]`` after the kinds that act on label scores (a label bias): each
        row's term from its own bank only."""
        for index, bank in enumerate(self.banks):
            if bank.label_stack:
                local = self.space.local_ids(index, slot_ids)
                scores = bank.kind.adjust_label_scores(bank.spec, labels, scores, bank.label_stack, local)
        return scores

    def _score_continuations(
        self, batch: Batch, continuation: torch.Tensor, continuation_mask: torch.Tensor
    ) -> torch.Tensor:
        """[rows * count] summed log-probabilities, row b * count + j continuing prompt b with label
        j. The prompts run once; the labels run in parts of at most ``LABEL_POSITIONS`` cached
        positions, so memory stays bounded however many labels a prompt has (each label continues from
        its own copy of the prompt's keys and values)."""
        count, width = continuation.shape
        rows = len(batch)
        run = self._run(batch, use_cache=True)
        prompt_cache = [(layer.keys, layer.values) for layer in run.cache.layers]
        step = labels_per_part(rows, run.mask.shape[1], width)
        parts = []
        for start in range(0, count, step):
            for layer, (keys, values) in zip(run.cache.layers, prompt_cache, strict=True):
                layer.keys, layer.values = keys, values  # the prompt's own, before the last part's tail
            part = slice(start, start + step)
            scores = self._score_part(run, batch.slot_ids, continuation[part], continuation_mask[part])
            parts.append(scores.view(rows, -1))
        return torch.cat(parts, dim=1).reshape(rows * count)

    def _score_part(
        self, run: _Run, slot_ids: torch.Tensor, continuation: torch.Tensor, continuation_mask: torch.Tensor
    ) -> torch.Tensor:
        count, width = continuation.shape
        rows = len(slot_ids)
        mask = run.mask  # [rows, cached]: everything the prompts' keys and values cover
        cache = run.cache
        cache.batch_repeat_interleave(count)  # row b * count + j continues prompt b with label j
        expanded_slots = slot_ids.repeat_interleave(count)
        token_mask = continuation_mask.repeat(rows, 1)
        positions = mask.sum(1).repeat_interleave(count)[:, None] + torch.arange(width, device=self.device)
        tail = self._decode(
            expanded_slots,
            input_ids=continuation.repeat(rows, 1),
            attention_mask=torch.cat([mask.repeat_interleave(count, 0), token_mask], dim=1),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        # Token k of a label is predicted by the prompt's last state (k = 0) or the label's token k - 1.
        last = run.hidden[:, -1].repeat_interleave(count, 0)[:, None]
        predicting = torch.cat([last, tail.last_hidden_state[:, :-1]], dim=1)
        row_index, column = token_mask.nonzero(as_tuple=True)
        targets = continuation.repeat(rows, 1)[row_index, column]
        states = predicting[row_index, column]  # [tokens, hidden]
        # The vocabulary projection in pieces: [tokens, vocab] floats at once is most of the memory.
        head = self.model.get_output_embeddings()
        log_probs = torch.cat(
            [
                torch.log_softmax(head(states[i : i + LOGIT_ROWS]).float(), dim=-1).gather(
                    1, targets[i : i + LOGIT_ROWS, None]
                )[:, 0]
                for i in range(0, len(states), LOGIT_ROWS)
            ]
        )
        return log_probs.new_zeros(rows * count).index_add(0, row_index, log_probs)

    def label_memory(self, rows: int, prompt_tokens: int, count: int, width: int) -> int:
        """An upper bound, in bytes, of what ``score_labels`` allocates for ``rows`` prompts of at most
        ``prompt_tokens`` tokens with ``count`` labels of at most ``width`` tokens (end token
        included): see ``label_memory``."""
        return label_memory(self.model.config, self.model.dtype, rows, prompt_tokens, count, width)

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
            with self.space.route(batch.slot_ids):
                texts.extend(generate_from_inputs(self.model, self.tokenizer, inputs, decode))
        return texts

    # ---- modes -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Bank tensors take gradients and module dropout is on; the base model stays frozen in eval."""
        for bank in self.banks:
            bank.trainable(True)
        try:
            yield
        finally:
            for bank in self.banks:
                bank.trainable(False)
